"""Fixtures for integration tests that run real processes (see harness.py).

Names are specific on purpose (``echo_app``, ``envoy_factory``): generic ones such as ``authz``
are left for the authorizer's fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    EchoApp,
    EnvoyFactory,
    ManagedProcess,
    free_port,
    leftover_processes,
    leftovers_of,
    live_processes,
    start_echo_app,
    start_envoy,
    started_processes,
    write_jwks,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything here starts real processes: mark it, so ``-m "not integration"`` never does."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _no_process_survives_the_session() -> Iterator[None]:
    """Stop whatever a test forgot, then assert (pgrep -g / pgrep -f) nothing is left."""
    yield
    for proc in live_processes():
        proc.stop()
    left = leftover_processes()
    assert not left, f"processes survived the test session: {left}"


@pytest.fixture(autouse=True)
def _no_process_survives_its_stop() -> Iterator[None]:
    """After each test: every process stopped during it is really gone (group and command)."""
    first = len(started_processes())
    yield
    live = set(live_processes())  # e.g. started by a session-scoped fixture: still in use
    stopped = [p for p in started_processes()[first:] if p not in live]
    left = leftovers_of(stopped)
    assert not left, f"processes survived stop(): {left}"


@pytest.fixture
def echo_app(tmp_path: Path) -> Iterator[EchoApp]:
    """The echo "legacy app" on a free port, named ``app``, with its access log on."""
    port = free_port()
    proc = start_echo_app(port, tmp_path, name="app")
    try:
        yield EchoApp(name="app", port=port, process=proc)
    finally:
        proc.stop()


@pytest.fixture
def envoy_factory(tmp_path: Path) -> Iterator[EnvoyFactory]:
    """``envoy_factory(config, admin_port)`` starts Envoy and stops it at teardown."""
    started: list[ManagedProcess] = []

    def factory(config: dict[str, Any], admin_port: int) -> ManagedProcess:
        proc = start_envoy(config, tmp_path, admin_port)
        started.append(proc)
        return proc

    try:
        yield factory
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture(scope="module")
def jwks_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JWKS file with one EC P-256 public key (for jwt_authn configs)."""
    return write_jwks(tmp_path_factory.mktemp("jwks") / "jwks.json")
