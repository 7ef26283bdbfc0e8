"""WIMSE end to end, all real processes on loopback:

    app A (urllib: sends no credentials, or forged ones)
      → sidecar A (`sidecar run`: unix attestation at the broker, egress `auth: wimse`)
      → wire tap (an on-path observer: forwards unchanged, remembers the last request)
      → Envoy (ingress of B, ext_authz over gRPC)
      → sidecar B (`sidecar run` with an `auth: wimse` route, WIT keys from the broker's
        SPIFFE bundle endpoint) → app B (the echo app)

The WIT comes from the broker (`requested_token_type` wit) bound to sidecar A's in-memory key;
every request carries it and a fresh WPT whose ``aud`` is the URL sidecar A called (the tap's,
which B lists in ``authz.authorities``). The observer's replay of a captured request is
refused (401 + ``WWW-Authenticate: WPT``), a tampered WIT is a 400.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.demo.tap import WireTap
from sidecar.envoy_config import ingress_bootstrap
from sidecar.identity.rfc8693_exchange import WIT_AUDIENCE
from sidecar.jose.b64 import b64url_decode
from tests.integration.harness import (
    REPO_ROOT,
    ManagedProcess,
    free_port,
    http_request,
    start_echo_app,
    start_envoy,
    wait_for_http,
)

FRONTEND = "spiffe://demo.local/ns/shop/sa/frontend"


@dataclass
class Stack:
    a_port: int
    a01_port: int
    a_admin: int
    b_admin: int
    envoy_port: int
    tap: WireTap
    processes: list[ManagedProcess] = field(default_factory=list)

    def call(self, path: str, port: int | None = None, **kw: Any) -> tuple[int, Any, Any]:
        return http_request(f"http://127.0.0.1:{port or self.a_port}{path}", **kw)

    def replay(self, headers: dict[str, str], path: str) -> tuple[int, Any, Any]:
        """Send captured headers to Envoy directly, Host included (the observer's position)."""
        return http_request(f"http://127.0.0.1:{self.envoy_port}{path}", headers=headers)


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("wimse")
    run_dir = tmp / "broker"  # short path: Unix socket paths are limited to 108 bytes
    run_dir.mkdir()
    broker_port, broker_admin = free_port(), free_port()
    a_port, a01_port, a_admin = free_port(), free_port(), free_port()
    b_grpc, b_admin = free_port(), free_port()
    app_port, envoy_port, envoy_admin = free_port(), free_port(), free_port()
    issuer = f"http://127.0.0.1:{broker_port}"
    tap = WireTap(envoy_port)
    tap_port = tap.start()
    tap_origin = f"http://127.0.0.1:{tap_port}"
    broker_cfg = _write(
        tmp / "broker.yaml",
        {
            "issuer": issuer,
            "listen": f"127.0.0.1:{broker_port}",
            "attestation": {"socket": str(run_dir / "attest.sock")},
            "admin": {"listen": f"127.0.0.1:{broker_admin}", "socket": str(run_dir / "admin.sock")},
            "entries": [
                {
                    "spiffe_id": FRONTEND,
                    "selectors": [f"unix:uid:{os.getuid()}"],
                    "audiences": ["spiffe://demo.local/unused"],
                }
            ],
        },
    )
    a_cfg = _write(
        tmp / "sidecar-a.yaml",
        {
            "identity": {"attestor": {"type": "unix", "socket": str(run_dir / "attest.sock")}},
            "egress": {
                "upstreams": [
                    {
                        "name": "orders",
                        "listen": f"127.0.0.1:{a_port}",
                        "upstream": tap_origin,
                        "auth": "wimse",
                        "wimse": {"other_tokens": ["x-partner-token"]},
                    },
                    {
                        "name": "orders-01",
                        "listen": f"127.0.0.1:{a01_port}",
                        "upstream": tap_origin,
                        "auth": "wimse",
                        "wimse": {"proof_header": "workload-proof-token"},
                    },
                ]
            },
            "admin": {"listen": f"127.0.0.1:{a_admin}"},
        },
    )
    b_cfg = _write(
        tmp / "sidecar-b.yaml",
        {
            "authz": {
                "audience": "spiffe://demo.local/ns/shop/sa/orders",
                "issuers": [{"issuer": issuer, "discovery": True}],
                "authorities": [tap_origin],
                "trust_domains": [
                    {
                        "name": "demo.local",
                        "bundle_endpoint": f"{issuer}/bundle",
                        "insecure_http": True,
                    }
                ],
                "wimse": {
                    "accept_proof_header": True,
                    "other_tokens": ["x-partner-token"],
                    # = the sender's proof_lifetime: a WPT has no iat, so after a restart the
                    # replay guard refuses WPTs for max_proof_lifetime - their lifetime.
                    "max_proof_lifetime": 30,
                },
                "grpc": {"listen": f"127.0.0.1:{b_grpc}"},
                "http": {"enabled": False},
                "routes": [{"prefix": "/", "auth": "wimse"}],
                "rules": [{"name": "frontend", "principals": [FRONTEND], "paths": ["/orders"]}],
            },
            "admin": {"listen": f"127.0.0.1:{b_admin}"},
        },
    )
    st = Stack(a_port, a01_port, a_admin, b_admin, envoy_port, tap)
    try:
        broker = ManagedProcess(
            [sys.executable, "-m", "sidecar", "broker", "-c", str(broker_cfg)],
            name="broker",
            log_dir=tmp,
            cwd=REPO_ROOT,
        ).start()
        st.processes.append(broker)
        wait_for_http(f"http://127.0.0.1:{broker_admin}/readyz", 20, process=broker)
        st.processes.append(start_echo_app(app_port, tmp, name="orders"))
        for name, cfg in (("sidecar-b", b_cfg), ("sidecar-a", a_cfg)):
            st.processes.append(
                ManagedProcess(
                    [sys.executable, "-m", "sidecar", "run", "-c", str(cfg)],
                    name=name,
                    log_dir=tmp,
                    cwd=REPO_ROOT,
                ).start()
            )
        wait_for_http(f"http://127.0.0.1:{b_admin}/readyz", 20, process=st.processes[-2])
        st.processes.append(
            start_envoy(
                ingress_bootstrap(
                    listen_port=envoy_port,
                    upstream_port=app_port,
                    admin_port=envoy_admin,
                    mode="grpc",
                    authz_port=b_grpc,
                ),
                tmp,
                envoy_admin,
            )
        )
        wait_for_http(f"http://127.0.0.1:{a_admin}/readyz", 20, process=st.processes[-2])
        yield st
    finally:
        for proc in reversed(st.processes):
            proc.stop()
        tap.stop()


def _claims(jws: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(b64url_decode(jws.split(".")[1]))
    return value


def test_a_call_carries_a_wit_and_a_wpt_and_the_app_sees_the_wit_sub(stack: Stack) -> None:
    status, _, body = stack.call(
        "/orders/42?x=1",
        headers={
            # Whatever the app sends as credentials is dropped: the sidecar's are used.
            "Authorization": "Bearer forged",
            "Workload-Identity-Token": "forged.wit.x",
            "Workload-Proof-Token": "forged.wpt.x",
            "X-Partner-Token": "partner-1",
        },
    )
    assert status == 200, body
    seen = json.loads(body)["headers"]
    assert seen["x-workload-id"] == FRONTEND
    assert seen["x-workload-auth"] == "wimse"
    for name in ("authorization", "workload-identity-token", "workload-proof-token"):
        assert name not in seen, name  # Envoy removed the credentials on allow
    assert seen["x-partner-token"] == "partner-1"
    wire = stack.tap.last
    assert wire is not None
    headers = {k.lower(): v for k, v in wire.headers.items()}
    scheme, _, wpt = headers["authorization"].partition(" ")
    assert scheme == "WPT" and "workload-proof-token" not in headers
    wit = _claims(headers["workload-identity-token"])
    assert wit["sub"] == FRONTEND and "aud" not in wit
    claims = _claims(wpt)
    assert claims["aud"] == f"http://127.0.0.1:{stack.tap.port}/orders/42"  # no query
    assert set(claims) == {"aud", "exp", "iat", "jti", "wth", "oth"}
    assert 0 < claims["exp"] - time.time() <= 31
    assert claims["exp"] - claims["iat"] == 30  # egress proof_lifetime
    assert list(claims["oth"]) == ["x-partner-token"]


def test_draft_01_carriage(stack: Stack) -> None:
    status, _, body = stack.call("/orders/7", port=stack.a01_port)
    assert status == 200, body
    assert json.loads(body)["headers"]["x-workload-id"] == FRONTEND
    wire = stack.tap.last
    assert wire is not None
    headers = {k.lower(): v for k, v in wire.headers.items()}
    assert "authorization" not in headers and headers["workload-proof-token"].count(".") == 2


def test_the_same_wpt_replayed_is_denied(stack: Stack) -> None:
    status, _, _ = stack.call("/orders/1")
    assert status == 200
    wire = stack.tap.last
    assert wire is not None
    status, headers, body = stack.replay(wire.headers, wire.path)
    assert status == 401, body
    assert headers["x-authz-reason"] == "replayed"
    assert headers["www-authenticate"].startswith("WPT")
    # A fresh request through the sidecar still passes: a new WPT each time.
    assert stack.call("/orders/1")[0] == 200


def test_a_bad_wit_is_a_400_and_a_missing_proof_a_401(stack: Stack) -> None:
    status, _, _ = stack.call("/orders/2")
    assert status == 200
    wire = stack.tap.last
    assert wire is not None
    headers = dict(wire.headers)
    name = next(k for k in headers if k.lower() == "workload-identity-token")
    h, p, s = headers[name].split(".")
    headers[name] = f"{h}.{p}.{s[:-4]}AAAA"  # the issuer's signature no longer verifies
    status, answer, _ = stack.replay(headers, wire.path)
    assert status == 400
    assert answer["x-authz-reason"] == "bad_signature" and "www-authenticate" not in answer
    status, answer, _ = stack.replay({"Workload-Identity-Token": headers[name]}, wire.path)
    assert status == 401 and answer["www-authenticate"].startswith("WPT")


def test_policy_still_applies_and_the_wit_is_refreshed_like_a_token(stack: Stack) -> None:
    status, headers, _ = stack.call("/admin")
    assert status == 403 and headers["x-authz-reason"] == "policy_denied"
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.a_admin}/tokens", timeout=5) as resp:
        slots = {e["audience"]: e for e in json.loads(resp.read())["audiences"]}
    wit = slots[WIT_AUDIENCE]
    assert wit["usable"] and wit["token_type"] == "WIT" and wit["claims"]["sub"] == FRONTEND
    assert wit["next_attempt_in"] > 0  # a refresh is scheduled, out of band
