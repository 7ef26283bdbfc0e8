"""Configuration checks of the ingress side that name the key and the expected value, and the
key source's back-off while an issuer has no keys."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sidecar.authz.config import parse_authz_config
from sidecar.config_util import parse_admin_listen
from sidecar.errors import ConfigError
from sidecar.jose import jwks
from sidecar.jose.jwks import JwksLocation, JwksSource, KeyStore


def base(**extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "audience": "spiffe://demo.local/ns/shop/sa/orders",
        "issuers": [{"issuer": "https://issuer.example", "jwks_uri": "https://issuer.example/k"}],
    }
    cfg.update(extra)
    return cfg


@pytest.mark.parametrize(
    ("extra", "key", "expected"),
    [
        ({"http": {"path_prefix": "authz"}}, "authz.http.path_prefix", "a path like /authz"),
        ({"http": {"path_prefix": "/authz/"}}, "authz.http.path_prefix", "no trailing /"),
        ({"http": {"path_prefix": 7}}, "authz.http.path_prefix", "a path like /authz"),
        ({"revocation": {"url": "issuer/revocations"}}, "authz.revocation.url", "http(s) URL"),
        ({"revocation": {"wait": 61}}, "authz.revocation.wait", "at most 60"),
        ({"revocation": {"wait": -1}}, "authz.revocation.wait", ">= 0"),
        ({"grpc": {"engine": "fast"}}, "authz.grpc.engine", "'loop', 'threads', 'aio'"),
        ({"grpc": {"workers": 65}}, "authz.grpc.workers", "from 1 to 64"),
        ({"grpc": {"workers": 0}}, "authz.grpc.workers", ">= 1"),
        # An empty allowlist would deny every token or proof silently: refused at load.
        (
            {
                "issuers": [
                    {"issuer": "https://i.example", "jwks_uri": "https://i/k", "algorithms": []}
                ]
            },
            "authz.issuers[0].algorithms",
            "at least one algorithm",
        ),
        ({"dpop": {"algorithms": []}}, "authz.dpop.algorithms", "at least one algorithm"),
        ({"dpop": {"algorithms": ["HS256"]}}, "authz.dpop.algorithms", "asymmetric"),
    ],
)
def test_bad_values_name_the_key(extra: dict[str, Any], key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_authz_config(base(**extra))
    assert str(info.value).startswith(key), str(info.value)
    assert expected in str(info.value)


def test_good_values_parse() -> None:
    cfg = parse_authz_config(
        base(
            http={"path_prefix": "/authz"},
            revocation={"url": "https://issuer.example/revocations"},
            grpc={"engine": "aio", "workers": 8},
        )
    )
    assert cfg.http_path_prefix == "/authz"
    assert cfg.revocation_url == "https://issuer.example/revocations"
    assert (cfg.grpc_engine, cfg.grpc_workers) == ("aio", 8)
    assert parse_authz_config(base()).grpc_engine == "loop"


def test_admin_section_refuses_unknown_keys() -> None:
    assert parse_admin_listen({"admin": {"listen": "127.0.0.1:1"}}) == ("127.0.0.1", 1)
    with pytest.raises(ConfigError) as info:
        parse_admin_listen({"admin": {"listen": "127.0.0.1:1", "lisen": "x"}})
    assert str(info.value).startswith("admin.lisen")


def test_no_keys_backs_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    delays: list[float] = []

    async def fake_sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) >= 8:
            raise asyncio.CancelledError

    monkeypatch.setattr(jwks.asyncio, "sleep", fake_sleep)
    missing = JwksLocation("https://issuer.example", file=str(tmp_path / "absent.json"))
    source = JwksSource(missing, KeyStore())
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(source.run_periodic())
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
