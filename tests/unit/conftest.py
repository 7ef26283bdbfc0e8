"""Fixtures for the sans-IO unit tests: no sockets, no subprocesses, no real clock."""

from __future__ import annotations

import os
import tempfile

import factory
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

# Hypothesis keeps caches (unicode tables, constants) in ./.hypothesis unless told otherwise:
# keep them out of the repository. No example database either, and no wall-clock deadline:
# the property tests assert behaviour, not speed.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "sidecar-unit-hypothesis"))
settings.register_profile(
    "unit",
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("unit")


@pytest.fixture(scope="session")
def es() -> factory.Issuer:
    return factory.es_issuer()


@pytest.fixture(scope="session")
def rsa_iss() -> factory.Issuer:
    return factory.rsa_issuer()


@pytest.fixture(scope="session")
def ed_iss() -> factory.Issuer:
    return factory.ed_issuer()


@pytest.fixture
def h(rsa_iss: factory.Issuer, ed_iss: factory.Issuer) -> factory.Harness:
    """A fresh authorizer (ES256 issuer first; RSA and Ed25519 issuers trusted too)."""
    return factory.make_harness(extra_issuers=(rsa_iss, ed_iss))
