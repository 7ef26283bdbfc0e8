"""The broker's issuer follows its listener when unset, and a set one that names another port
is warned about at start (issue 11.8: a broker ran with issuer :8443 while listening on 18443)."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sidecar.broker.config import parse_broker_config
from sidecar.broker.service import BrokerService
from sidecar.errors import ConfigError


@pytest.mark.parametrize(
    ("listen", "issuer"),
    [
        ("127.0.0.1:18443", "http://127.0.0.1:18443"),
        ("[::1]:9000", "http://[::1]:9000"),
        ("broker.internal:8443", "http://broker.internal:8443"),
    ],
)
def test_unset_issuer_is_derived_from_listen(listen: str, issuer: str) -> None:
    cfg = parse_broker_config({"listen": listen})
    assert (cfg.issuer, cfg.issuer_from_listen) == (issuer, True)


def test_a_set_issuer_is_kept() -> None:
    cfg = parse_broker_config({"listen": "127.0.0.1:18443", "issuer": "https://idp.example"})
    assert (cfg.issuer, cfg.issuer_from_listen) == ("https://idp.example", False)


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_a_wildcard_listen_needs_an_issuer(host: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_broker_config({"listen": f"{host}:8443"})
    assert err.value.key == "issuer"


def _start_and_read_discovery(
    tmp_path: Path, **top: Any
) -> tuple[BrokerService, int, dict[str, Any]]:
    run = tmp_path / "run"
    cfg = parse_broker_config(
        {
            "listen": "127.0.0.1:0",
            "attestation": {"enabled": False},
            "admin": {"enabled": False, "socket": str(run / "admin.sock")},
            "audit": {"path": str(tmp_path / "audit.log")},
            **top,
        }
    )
    service = BrokerService(cfg, CollectorRegistry())

    async def scenario() -> tuple[int, dict[str, Any]]:
        await service.start()
        try:
            port = service.http_port
            assert port is not None and port != 0
            url = f"http://127.0.0.1:{port}/.well-known/openid-configuration"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
            return port, json.loads(body)
        finally:
            await service.stop()

    port, doc = asyncio.run(scenario())
    return service, port, doc


def test_the_derived_issuer_names_the_bound_port(tmp_path: Path) -> None:
    """listen port 0: the issuer (and every endpoint in discovery) has the port bound."""
    service, port, doc = _start_and_read_discovery(tmp_path)
    assert doc["issuer"] == f"http://127.0.0.1:{port}"
    assert doc["token_endpoint"] == f"http://127.0.0.1:{port}/token"
    assert service.cfg.issuer == doc["issuer"]


def test_an_issuer_naming_another_port_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sidecar.broker.service"):
        _, port, doc = _start_and_read_discovery(tmp_path, issuer="http://127.0.0.1:8443")
    assert doc["issuer"] == "http://127.0.0.1:8443"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("names port 8443" in w and f"listens on port {port}" in w for w in warnings)


def test_no_warning_when_the_issuer_names_the_listen_port(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sidecar.broker.service"):
        _, port, doc = _start_and_read_discovery(tmp_path)
    assert not [r for r in caplog.records if "names port" in r.getMessage()]
    assert doc["issuer"].endswith(f":{port}")
