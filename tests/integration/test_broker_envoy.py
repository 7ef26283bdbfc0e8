"""Broker-issued tokens end to end: broker → (token) → client → Envoy → ext_authz (sidecar authz,
keys by OIDC discovery against the broker) → echo app; all real processes.

The broker here rotates its signing key every 3 s (next key published 2 s ahead), so every
test in this module runs across rotations; one test hammers the path through two or more of
them and counts failures.
"""

from __future__ import annotations

import base64
import http.client
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from sidecar.envoy_config import ingress_bootstrap
from sidecar.jose.rfc9449_dpop import ProofSigner
from tests.integration.broker_process import (
    TRUST,
    BrokerProcess,
    ClusterIssuer,
    cluster_config,
    k8s_entries,
    new_signer,
    python_entries,
)
from tests.integration.harness import (
    ManagedProcess,
    free_port,
    http_request,
    start_echo_app,
    start_envoy,
    wait_for_http,
)

ORDERS = f"{TRUST}/ns/shop/sa/orders"
ROTATE_EVERY = 3.0


@dataclass
class Stack:
    broker: BrokerProcess
    cluster: ClusterIssuer
    authz: ManagedProcess
    authz_admin: int
    envoy_port: int
    envoy: ManagedProcess

    def call(
        self, token: str, signer: ProofSigner, path: str = "/orders/1"
    ) -> tuple[int, dict[str, str], Any]:
        url = f"http://127.0.0.1:{self.envoy_port}{path}"
        proof = signer.proof(method="GET", url=url, now=time.time(), access_token=token)
        conn = http.client.HTTPConnection("127.0.0.1", self.envoy_port, timeout=10)
        try:
            try:
                conn.request("GET", path, headers={"Authorization": f"DPoP {token}", "DPoP": proof})
            except ConnectionRefusedError as exc:  # say why: Envoy's state and its log
                raise AssertionError(
                    f"Envoy refused: {self.envoy!r}\n{self.envoy.log_text(4000)}"
                ) from exc
            resp = conn.getresponse()
            raw = resp.read()
            headers = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        return resp.status, headers, body


def kid_of(token: str) -> str:
    head = token.split(".", 1)[0]
    kid = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"]
    assert isinstance(kid, str)
    return kid


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("broker-envoy")
    cluster = ClusterIssuer()
    broker = BrokerProcess(
        tmp,
        entries=python_entries() + k8s_entries(cluster.issuer),
        clusters=[cluster_config(cluster)],
        extra={
            # Retired keys stay published for the longest lifetime they signed, WITs
            # included: the shortest wit_ttl keeps fast rotation within the key-count bound.
            "tokens": {"ttl": 6, "wit_ttl": 60},
            "keys": {
                "rotate_every": ROTATE_EVERY,
                "prepublish": 2,
                "jwks_max_age": 1,
                "retire_grace": 2,
            },
        },
    )
    grpc_port, admin_port = free_port(), free_port()
    app_port, envoy_port, envoy_admin = free_port(), free_port(), free_port()
    authz_cfg = {
        "authz": {
            "audience": ORDERS,
            "issuers": [
                {
                    "issuer": broker.issuer,
                    "discovery": True,
                    "algorithms": ["ES256"],
                    "refresh_interval": 1,
                    "min_refresh_interval": 0.5,
                }
            ],
            "grpc": {"listen": f"127.0.0.1:{grpc_port}"},
            "http": {"enabled": False},
            "revocation": {"url": f"{broker.issuer}/revocations", "interval": 0.5},
            "rules": [
                {
                    "name": "test",
                    "principals": [f"{TRUST}/**"],
                    "methods": ["GET"],
                    "paths": ["/orders"],
                },
            ],
        },
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
    }
    (tmp / "authz.yaml").write_text(yaml.safe_dump(authz_cfg))
    started: list[Any] = []
    try:
        started.append(broker.start())
        app = start_echo_app(app_port, tmp, name="orders")
        started.append(app)
        authz = ManagedProcess(
            [sys.executable, "-m", "sidecar", "authz", "-c", str(tmp / "authz.yaml")],
            name="authz",
            log_dir=tmp,
        ).start()
        started.append(authz)
        wait_for_http(f"http://127.0.0.1:{admin_port}/readyz", 20, process=authz)
        envoy = start_envoy(
            ingress_bootstrap(
                listen_port=envoy_port,
                upstream_port=app_port,
                admin_port=envoy_admin,
                mode="grpc",
                authz_port=grpc_port,
            ),
            tmp,
            envoy_admin,
        )
        started.append(envoy)
        yield Stack(broker, cluster, authz, admin_port, envoy_port, envoy)
    finally:
        for proc in reversed(started):
            proc.stop()
        cluster.stop()


def test_unix_and_exchanged_tokens_pass_envoy(stack: Stack) -> None:
    signer = new_signer()
    token = stack.broker.unix_token([ORDERS], signer).token
    status, _, body = stack.call(token, signer)
    assert status == 200, body
    assert body["headers"]["x-workload-id"] == f"{TRUST}/unix/python"
    assert body["headers"]["x-workload-auth"] == "dpop"

    signer = new_signer()
    token = stack.broker.exchange(stack.cluster.sa_token(), [ORDERS], signer).token
    status, _, body = stack.call(token, signer)
    assert status == 200, body
    assert body["headers"]["x-workload-id"] == f"{TRUST}/ns/shop/sa/frontend"

    # The binding holds end to end: the same token with a proof from another key is refused.
    status, headers, _ = stack.call(token, new_signer())
    assert status == 401 and headers["x-authz-reason"] == "proof_key_mismatch"


def test_rotation_under_continuous_traffic_loses_nothing(stack: Stack) -> None:
    """Fresh tokens (signed by whatever key is active) and tokens a few seconds old (often
    signed by a key retired since) go through Envoy non-stop across rotations."""
    deadline = time.monotonic() + 2.4 * ROTATE_EVERY
    kids_seen: list[str] = []  # in order of first appearance
    held: list[tuple[float, str, ProofSigner]] = []
    failures: list[tuple[int, Any]] = []
    calls = retired_ok = 0
    while time.monotonic() < deadline:
        signer = new_signer()
        token = stack.broker.unix_token([ORDERS], signer).token
        kid = kid_of(token)
        if kid not in kids_seen:
            kids_seen.append(kid)
        held.append((time.monotonic(), token, signer))
        batch = [(token, signer)]
        # A token obtained ~2 s ago, still valid (ttl 6 s): likely from the previous key.
        old = next((h for h in held if time.monotonic() - h[0] >= 2.0), None)
        if old is not None:
            held.remove(old)
            batch.append((old[1], old[2]))
            if kids_seen.index(kid_of(old[1])) < len(kids_seen) - 1:
                retired_ok += 1
        for tok, sig in batch:
            status, headers, body = stack.call(tok, sig)
            calls += 1
            if status != 200:
                failures.append((status, headers.get("x-authz-reason") or body))
        time.sleep(0.02)
    assert not failures, f"{len(failures)}/{calls} failed: {failures[:5]}"
    assert len(kids_seen) >= 2, kids_seen
    assert retired_ok > 0, "no token of a retired key was exercised"
    # Pre-publication worked: the authorizer never met an unknown kid (it had each next key
    # from its periodic refresh before the broker signed with it).
    metrics = http_request(f"http://127.0.0.1:{stack.authz_admin}/metrics")[2].decode()
    unknown_kid = [
        line
        for line in metrics.splitlines()
        if line.startswith("sidecar_jwks_refreshes_total{") and 'trigger="unknown_kid"' in line
    ]
    assert not unknown_kid, unknown_kid
    print(f"calls={calls} kids={len(kids_seen)} retired_key_calls={retired_ok}")
    events = [r["event"] for r in stack.broker.audit() if r["event"].startswith("key_")]
    assert events.count("key_activated") >= 2 and "key_published" in events


def test_revoked_subject_is_denied_through_envoy(stack: Stack) -> None:
    signer = new_signer()
    token = stack.broker.exchange(stack.cluster.sa_token(), [ORDERS], signer).token
    assert stack.call(token, signer)[0] == 200
    subject = f"{TRUST}/ns/shop/sa/frontend"
    rc, _, err = stack.broker.revoke("--sub", subject)
    assert rc == 0, err
    revoked_at = time.monotonic()
    try:
        while True:
            status, headers, _ = stack.call(token, signer)
            if status == 401 and headers.get("x-authz-reason") == "revoked":
                break
            assert status == 200, (status, headers)
            assert time.monotonic() - revoked_at < 5.0, "revocation not enforced within 5 s"
            time.sleep(0.1)
        # Other workloads are unaffected, and the broker issues nothing more to the subject.
        other = new_signer()
        assert stack.call(stack.broker.unix_token([ORDERS], other).token, other)[0] == 200
        refused = stack.broker.exchange(stack.cluster.sa_token(), [ORDERS])
        # RFC 8693 §2.2.2: a subject refused by policy is invalid_request on token exchange.
        assert (refused.status, refused.error) == (400, "invalid_request")
        assert "revoked" in refused.body["error_description"]
    finally:
        assert stack.broker.revoke("--sub", subject, "--restore")[0] == 0
