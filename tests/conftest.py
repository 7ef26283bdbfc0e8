"""Fixtures for unit and integration tests alike."""

from __future__ import annotations

import pytest

from tests.tls_pki import LocalPKI, make_pki


@pytest.fixture(scope="session")
def local_pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPKI:
    """A CA made for this test session, with a server and a client certificate."""
    return make_pki(tmp_path_factory.mktemp("pki"))
