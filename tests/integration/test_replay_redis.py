"""The shared replay store against a real redis-server: two authorizer replicas refuse each
other's used proofs, a Redis outage fails closed (503 replay_store_unavailable), and a proof
used before Redis restarted is not accepted again after it (503 proof_predates_restart)."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from tests.integration.harness import (
    ManagedProcess,
    free_port,
    http_request,
    wait_for_http,
    wait_for_port,
)
from tests.integration.issuer import AUDIENCE, DevIssuer, client_signer

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server not installed"
)


def _start_redis(tmp: Path, port: int, name: str) -> ManagedProcess:
    """No automatic snapshots; a dump.rdb in ``tmp`` (made by SAVE) is loaded at start."""
    proc = ManagedProcess(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        name=name,
        log_dir=tmp,
    ).start()
    wait_for_port("127.0.0.1", port, 10, process=proc)
    return proc


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[ManagedProcess, int]]:
    port = free_port()
    proc = _start_redis(tmp_path, port, f"redis-{port}")
    try:
        yield proc, port
    finally:
        proc.stop()


def _replica(
    tmp: Path, name: str, issuer: DevIssuer, redis_port: int
) -> tuple[ManagedProcess, int]:
    http_port, admin_port = free_port(), free_port()
    cfg = {
        "authz": {
            "audience": AUDIENCE,
            "issuers": [{"issuer": issuer.issuer, "jwks_file": str(tmp / "jwks.json")}],
            "grpc": {"enabled": False},
            "http": {"listen": f"127.0.0.1:{http_port}"},
            "replay": {"backend": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0"},
            "rules": [{"name": "all", "principals": ["**"], "paths": ["/"]}],
        },
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = ManagedProcess(
        [sys.executable, "-m", "sidecar", "authz", "-c", str(path)], name=name, log_dir=tmp
    ).start()
    wait_for_http(f"http://127.0.0.1:{admin_port}/readyz", 20, process=proc)
    return proc, http_port


def test_replicas_share_replay_state_and_fail_closed(
    tmp_path: Path, redis_server: tuple[ManagedProcess, int]
) -> None:
    redis_proc, redis_port = redis_server
    issuer = DevIssuer()
    issuer.write_jwks(tmp_path / "jwks.json")
    a, a_port = _replica(tmp_path, "replica-a", issuer, redis_port)
    b, b_port = _replica(tmp_path, "replica-b", issuer, redis_port)
    try:
        signer = client_signer()
        token = issuer.token(jkt=signer.thumbprint)
        # The URL the client used (Envoy forwards Host): both replicas serve "orders".
        url = "http://orders.local/orders/1"
        proof = signer.proof(method="GET", url=url, now=time.time(), access_token=token)
        headers = {"Host": "orders.local", "Authorization": f"DPoP {token}", "DPoP": proof}
        status, hdrs, _ = http_request(f"http://127.0.0.1:{a_port}/orders/1", headers=headers)
        assert status == 200, hdrs
        assert hdrs["x-workload-id"].startswith("spiffe://")
        status, hdrs, _ = http_request(f"http://127.0.0.1:{b_port}/orders/1", headers=headers)
        assert (status, hdrs.get("x-authz-reason")) == (401, "replayed")

        redis_proc.stop()
        fresh = signer.proof(method="GET", url=url, now=time.time(), access_token=token)
        headers["DPoP"] = fresh
        status, hdrs, _ = http_request(f"http://127.0.0.1:{a_port}/orders/1", headers=headers)
        assert (status, hdrs.get("x-authz-reason")) == (503, "replay_store_unavailable")
        assert hdrs.get("retry-after") == "1"
        assert a.is_running() and b.is_running()
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("snapshot", [False, True], ids=["no-persistence", "old-snapshot"])
def test_a_proof_used_before_redis_restarts_is_refused_after(
    tmp_path: Path, redis_server: tuple[ManagedProcess, int], snapshot: bool
) -> None:
    """Redis restarts and forgets the used proofs, either entirely (no persistence) or those
    since its last snapshot; the replay of a proof used just before is still refused."""
    redis_proc, redis_port = redis_server
    issuer = DevIssuer()
    issuer.write_jwks(tmp_path / "jwks.json")
    a, a_port = _replica(tmp_path, "replica-a", issuer, redis_port)
    restarted: ManagedProcess | None = None
    try:
        signer = client_signer()
        token = issuer.token(jkt=signer.thumbprint)
        url = "http://orders.local/orders/1"
        if snapshot:
            redis.Redis(port=redis_port).save()  # holds the epoch marker, not the proof below
        proof = signer.proof(method="GET", url=url, now=time.time(), access_token=token)
        headers = {"Host": "orders.local", "Authorization": f"DPoP {token}", "DPoP": proof}
        status, hdrs, _ = http_request(f"http://127.0.0.1:{a_port}/orders/1", headers=headers)
        assert status == 200, hdrs

        redis_proc.stop()
        restarted = _start_redis(tmp_path, redis_port, f"redis-{redis_port}-again")
        if snapshot:  # the snapshot was loaded: the marker survived, the proof's key did not
            assert redis.Redis(port=redis_port).exists("wis:dpop:epoch")
        for _ in range(50):  # the pooled connections to the old Redis fail first (fail closed)
            status, hdrs, _ = http_request(f"http://127.0.0.1:{a_port}/orders/1", headers=headers)
            if hdrs.get("x-authz-reason") != "replay_store_unavailable":
                break
            time.sleep(0.05)
        assert (status, hdrs.get("x-authz-reason")) == (503, "proof_predates_restart"), hdrs
        wait = int(hdrs["retry-after"])
        assert 1 <= wait <= 7  # future_leeway 5 + whole-second iat + this request's time

        time.sleep(wait)
        fresh = signer.proof(method="GET", url=url, now=time.time(), access_token=token)
        status, hdrs, _ = http_request(
            f"http://127.0.0.1:{a_port}/orders/1", headers={**headers, "DPoP": fresh}
        )
        assert status == 200, hdrs
        status, hdrs, _ = http_request(f"http://127.0.0.1:{a_port}/orders/1", headers=headers)
        assert hdrs.get("x-authz-reason") in {"proof_predates_restart", "replayed"}, hdrs
    finally:
        a.stop()
        if restarted is not None:
            restarted.stop()
