"""Configuration checks of the ingress side that name the key and the expected value, and the
key source's back-off while an issuer has no keys."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from sidecar.authz.config import parse_authz_config
from sidecar.authz.workers import PoolRegistry, merge_worker_metrics, with_shared_secret
from sidecar.config_util import parse_admin_listen
from sidecar.errors import ConfigError
from sidecar.jose.jwks import KeyStore
from sidecar.jwks_source import JwksLocation, JwksSource


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

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)  # the module jwks sleeps through
    missing = JwksLocation("https://issuer.example", file=str(tmp_path / "absent.json"))
    # Draws at both ends: the top of the jitter range is the old 1, 2, 4 … 30 s schedule, the
    # bottom half of it (equal jitter: never an immediate retry).
    draws = iter([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.5])
    source = JwksSource(missing, KeyStore(), draw=lambda: next(draws))
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(source.run_periodic())
    assert delays == [1.0, 1.0, 4.0, 4.0, 16.0, 15.0, 30.0, 22.5]


@pytest.mark.parametrize(
    ("extra", "key", "expected"),
    [
        ({"workers": 0}, "authz.workers", "from 1 to 256, or auto"),
        ({"workers": "many"}, "authz.workers", "from 1 to 256, or auto"),
        # Two workers of the default listeners: gRPC 9191, 9192 and HTTP 9192, 9193 collide.
        ({"workers": 2}, "authz.http.listen", "outside the gRPC workers' 127.0.0.1:9191"),
        (
            {
                "workers": 2,
                "grpc": {"listen": "unix:/run/a.sock"},
                "http": {"listen": "unix:/run/a.sock"},
            },
            "authz.http.listen",
            "outside the gRPC workers'",
        ),
        ({"workers": 3, "grpc": {"listen": "127.0.0.1:65534"}}, "authz.grpc.listen", "65533"),
    ],
)
def test_bad_worker_settings_name_the_key(extra: dict[str, Any], key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_authz_config(base(**extra))
    assert str(info.value).startswith(key), str(info.value)
    assert expected in str(info.value)


def test_workers_default_to_one_and_auto_is_the_usable_cores() -> None:
    assert parse_authz_config(base()).workers == 1
    auto = parse_authz_config(base(workers="auto", http={"listen": "127.0.0.1:9291"}))
    assert auto.workers == len(os.sched_getaffinity(0))


def test_workers_share_the_configured_nonce_secret_byte_for_byte(tmp_path: Path) -> None:
    secret_file = tmp_path / "nonce"
    secret_file.write_text("a-secret-of-at-least-16-bytes\n")
    for nonce in ({"secret": "configured-secret-0123"}, {"secret_file": str(secret_file)}):
        data = {"authz": base(nonce=nonce)}
        parent = parse_authz_config(data["authz"])
        shared = with_shared_secret(data, parent, "unused-generated-secret")
        assert "secret_file" not in shared["authz"]["nonce"]
        # A replica on another host with the same configuration accepts the same nonces.
        assert parse_authz_config(shared["authz"]).nonce_secret == parent.nonce_secret
    generated = with_shared_secret({"authz": base()}, parse_authz_config(base()), "g" * 43)
    assert generated["authz"]["nonce"]["secret"] == "g" * 43


def test_worker_metrics_are_merged_with_a_worker_label() -> None:
    text = (
        "# HELP sidecar_authz_decisions_total d\n# TYPE sidecar_authz_decisions_total counter\n"
        'sidecar_authz_decisions_total{reason="replayed"} %d\n'
    )
    (family,) = merge_worker_metrics({0: text % 2, 1: text % 5})
    assert family.name == "sidecar_authz_decisions"
    assert [(s.labels, s.value) for s in family.samples] == [
        ({"worker": "0", "reason": "replayed"}, 2.0),
        ({"worker": "1", "reason": "replayed"}, 5.0),
    ]


def test_sidecar_run_refuses_worker_processes() -> None:
    from sidecar import run_command

    authz = base(workers=2, http={"listen": "127.0.0.1:9291"})
    with pytest.raises(ConfigError) as info:
        asyncio.run(run_command.serve({"authz": authz}))
    assert str(info.value).startswith("authz.workers: expected 1 under `sidecar run`")


def test_parent_and_worker_families_are_rendered_once() -> None:
    from prometheus_client import Gauge, generate_latest

    registry = PoolRegistry()
    Gauge("sidecar_open_fds", "fds", registry=registry).set(7)
    text = "# HELP sidecar_open_fds fds\n# TYPE sidecar_open_fds gauge\nsidecar_open_fds 9\n"
    registry.worker_families = merge_worker_metrics({0: text})
    out = generate_latest(registry).decode()
    assert out.count("# TYPE sidecar_open_fds gauge") == 1
    assert "sidecar_open_fds 7.0" in out and 'sidecar_open_fds{worker="0"} 9.0' in out
