"""Fixtures for the sans-IO unit tests: no sockets, no subprocesses, no real clock."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

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


class _NoProcesses(subprocess.Popen[Any]):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(
            "a unit test started a process: mark it @pytest.mark.integration "
            "(so `-m 'not integration'` stays process-free) or move it to tests/integration"
        )


@pytest.fixture(autouse=True)
def _processes_only_in_integration_tests(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setattr(subprocess, "Popen", _NoProcesses)
    yield


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
