"""``authz.workers: 2`` behind the real Envoy: one parent, two worker processes, each with its
own gRPC and HTTP listener, listed as two endpoints of Envoy's ext_authz cluster.

A proof used at one worker is refused by the other (shared LMDB replay store), a nonce issued
by one is honoured by the other (shared secret), a killed worker is replaced, and while it is
down Envoy retries the checks on the other worker: no request fails."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar.envoy_config import ingress_bootstrap
from tests.integration.harness import (
    ManagedProcess,
    envoy_stats,
    free_port,
    free_port_pair,
    http_request,
    start_echo_app,
    start_envoy,
    wait_for_http,
    wait_for_port,
)
from tests.integration.issuer import AUDIENCE, FRONTEND, DevIssuer, client_signer


@dataclass
class Pool:
    parent: ManagedProcess
    issuer: DevIssuer
    grpc_base: int
    http_base: int
    admin_port: int
    envoy_port: int
    envoy_admin: int

    def worker_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.parent.pid)], capture_output=True, text=True, check=False
        ).stdout
        return sorted(int(p) for p in out.split())

    def metrics(self) -> str:
        status, _, body = http_request(f"http://127.0.0.1:{self.admin_port}/metrics")
        assert status == 200
        return body.decode()

    def worker_url(self, index: int, path: str) -> str:
        return f"http://127.0.0.1:{self.http_base + index}{path}"

    def envoy_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.envoy_port}{path}"


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    tmp = tmp_path_factory.mktemp("authz-workers")
    issuer = DevIssuer()
    grpc_base, http_base = free_port_pair(), free_port_pair()
    admin_port, app_port, envoy_port, envoy_admin = (free_port() for _ in range(4))
    cfg = {
        "authz": {
            "audience": AUDIENCE,
            "workers": 2,
            "issuers": [
                {"issuer": issuer.issuer, "jwks_file": str(issuer.write_jwks(tmp / "jwks.json"))}
            ],
            "grpc": {"listen": f"127.0.0.1:{grpc_base}"},
            "http": {"listen": f"127.0.0.1:{http_base}"},
            # No nonce secret configured: the parent makes one for both workers.
            "routes": [
                {"prefix": "/nonce", "auth": "dpop", "nonce": True},
                {"prefix": "/bearer", "auth": "bearer"},
            ],
            "rules": [{"name": "all", "principals": [FRONTEND], "paths": ["/"]}],
        },
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
    }
    (tmp / "authz.yaml").write_text(yaml.safe_dump(cfg))
    app = start_echo_app(app_port, tmp, name="workers", access_log=False)
    parent = ManagedProcess(
        [sys.executable, "-m", "sidecar", "authz", "-c", str(tmp / "authz.yaml")],
        name="authz-workers",
        log_dir=tmp,
    ).start()
    envoy = None
    try:
        wait_for_http(f"http://127.0.0.1:{admin_port}/readyz", 30, process=parent)
        envoy = start_envoy(
            ingress_bootstrap(
                listen_port=envoy_port,
                upstream_port=app_port,
                admin_port=envoy_admin,
                mode="grpc",
                authz_port=grpc_base,
                authz_workers=2,
            ),
            tmp,
            envoy_admin,
        )
        yield Pool(parent, issuer, grpc_base, http_base, admin_port, envoy_port, envoy_admin)
    finally:
        for proc in (envoy, parent, app):
            if proc is not None:
                proc.stop()


def _dpop(pool: Pool, url: str, nonce: str | None = None) -> dict[str, str]:
    signer = client_signer()
    token = pool.issuer.token(jkt=signer.thumbprint)
    proof = signer.proof(method="GET", url=url, now=time.time(), access_token=token, nonce=nonce)
    return {"Authorization": f"DPoP {token}", "DPoP": proof}


def test_two_workers_run_under_one_parent(pool: Pool) -> None:
    assert len(pool.worker_pids()) == 2
    log = pool.parent.log_text()
    assert "authz ready workers=2" in log
    assert "authz worker 0 ready" in log and "authz worker 1 ready" in log
    # The parent made one secret for both workers: warned once (other hosts' replicas would
    # not share it), not once per worker.
    assert log.count("nonce.secret is not set") == 1


def test_proof_used_at_one_worker_is_refused_by_the_other(pool: Pool) -> None:
    # Worker 1's HTTP listener is http_base + 1; the proof names the URL the client used.
    headers = {"Host": "orders.local", **_dpop(pool, "http://orders.local/orders/1")}
    status, hdrs, _ = http_request(pool.worker_url(0, "/orders/1"), headers=headers)
    assert status == 200, hdrs
    status, hdrs, _ = http_request(pool.worker_url(1, "/orders/1"), headers=headers)
    assert (status, hdrs.get("x-authz-reason")) == (401, "replayed")


def test_replays_through_envoy_are_refused_by_both_workers(pool: Pool) -> None:
    url = pool.envoy_url("/orders/2")
    headers = _dpop(pool, url)
    assert http_request(url, headers=headers)[0] == 200
    for _ in range(16):  # round robin: both workers get some
        status, hdrs, _ = http_request(url, headers=headers)
        assert (status, hdrs.get("x-authz-reason")) == (401, "replayed")
    replayed: dict[str, float] = {}
    for family in text_string_to_metric_families(pool.metrics()):
        for sample in family.samples:
            if (
                sample.name == "sidecar_authz_decisions_total"
                and sample.labels.get("reason") == "replayed"
            ):
                worker = sample.labels["worker"]
                replayed[worker] = replayed.get(worker, 0.0) + sample.value
    assert sum(replayed.values()) >= 16
    assert replayed.get("0", 0) >= 1 and replayed.get("1", 0) >= 1, replayed


def test_envoy_http_mode_spreads_checks_over_both_workers(pool: Pool, tmp_path: Path) -> None:
    envoy_port, envoy_admin = free_port(), free_port()
    app_port = free_port()
    app = start_echo_app(app_port, tmp_path, name="workers-http", access_log=False)
    envoy = start_envoy(
        ingress_bootstrap(
            listen_port=envoy_port,
            upstream_port=app_port,
            admin_port=envoy_admin,
            mode="http",
            authz_port=pool.http_base,
            authz_workers=2,
        ),
        tmp_path,
        envoy_admin,
    )
    try:
        url = f"http://127.0.0.1:{envoy_port}/orders/3"
        headers = _dpop(pool, url)
        assert http_request(url, headers=headers)[0] == 200
        for _ in range(8):
            status, hdrs, _ = http_request(url, headers=headers)
            assert (status, hdrs.get("x-authz-reason")) == (401, "replayed")
        sent = envoy_stats(envoy_admin, r"^cluster\.ext_authz_http\.upstream_cx_total$")
        assert sent["cluster.ext_authz_http.upstream_cx_total"] >= 2  # both workers reached
    finally:
        envoy.stop()
        app.stop()


def test_nonce_from_one_worker_is_honoured_by_the_other(pool: Pool) -> None:
    url = "http://orders.local/nonce/x"
    headers = {"Host": "orders.local", **_dpop(pool, url)}
    status, hdrs, _ = http_request(pool.worker_url(0, "/nonce/x"), headers=headers)
    assert (status, hdrs.get("x-authz-reason")) == (401, "nonce_required")
    nonce = hdrs["dpop-nonce"]
    headers = {"Host": "orders.local", **_dpop(pool, url, nonce=nonce)}
    status, hdrs, _ = http_request(pool.worker_url(1, "/nonce/x"), headers=headers)
    assert status == 200, hdrs


def _decisions(pool: Pool) -> dict[str, float]:
    """Checks decided so far, by "result reason", summed over the workers."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(pool.metrics()):
        for sample in family.samples:
            if sample.name == "sidecar_authz_decisions_total":
                key = f"{sample.labels['result']} {sample.labels['reason']}".strip()
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_a_slow_check_is_decided_once_not_retried(pool: Pool, tmp_path: Path, mode: str) -> None:
    """Both workers stall for 300 ms (well inside the 2 s check timeout) while one DPoP check
    is in flight. Envoy must wait for it, not cancel it and retry on the other worker: that
    worker would see the proof again and deny it as replayed, and under load every slow check
    would be decided up to six times (the collapse of issue 9's two-worker DPoP rows)."""
    envoy_port, envoy_admin, app_port = free_port(), free_port(), free_port()
    app = start_echo_app(app_port, tmp_path, name=f"workers-slow-{mode}", access_log=False)
    envoy = start_envoy(
        ingress_bootstrap(
            listen_port=envoy_port,
            upstream_port=app_port,
            admin_port=envoy_admin,
            mode=mode,  # type: ignore[arg-type]
            authz_port=pool.grpc_base if mode == "grpc" else pool.http_base,
            authz_workers=2,
            authz_timeout_ms=2000,
        ),
        tmp_path,
        envoy_admin,
    )
    pids = pool.worker_pids()
    try:
        url = f"http://127.0.0.1:{envoy_port}/orders/5"
        assert http_request(url, headers=_dpop(pool, url))[0] == 200  # connections are up
        before = _decisions(pool)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)

        def resume_all() -> None:
            for p in pids:
                os.kill(p, signal.SIGCONT)

        resume = threading.Timer(0.3, resume_all)
        resume.start()
        try:
            status, hdrs, _ = http_request(url, headers=_dpop(pool, url))
        finally:
            resume.join()
        cluster = "ext_authz" if mode == "grpc" else "ext_authz_http"
        stats = {k: v for k, v in envoy_stats(envoy_admin, rf"^cluster\.{cluster}\.").items() if v}
        assert (status, hdrs.get("x-authz-reason")) == (200, None), stats
        after = _decisions(pool)
        decided = {r: after[r] - before.get(r, 0.0) for r in after if after[r] != before.get(r)}
        # Decided once, allowed: no second attempt denied as replayed.
        assert list(decided.values()) == [1.0], (decided, stats)
        assert next(iter(decided)).startswith("allow"), (decided, stats)
        assert stats.get(f"cluster.{cluster}.upstream_rq_per_try_timeout", 0) == 0, stats
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        envoy.stop()
        app.stop()


def test_killed_worker_is_replaced_and_no_request_is_lost(pool: Pool) -> None:
    token = pool.issuer.token()
    url = pool.envoy_url("/bearer/x")
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            results.append(http_request(url, headers={"Authorization": f"Bearer {token}"})[0])

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        before = pool.worker_pids()
        os.kill(before[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = pool.worker_pids()
            if len(now) == 2 and before[0] not in now:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"worker not replaced: {before} -> {pool.worker_pids()}")
        # The replacement listens again on its own ports.
        for index in (0, 1):
            wait_for_port("127.0.0.1", pool.grpc_base + index, 20, process=pool.parent)
        wait_for_http(f"http://127.0.0.1:{pool.admin_port}/readyz", 20)
        time.sleep(1.5)  # Envoy's health check puts it back; load goes on meanwhile
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(results) > 20
    stats = {
        k: v
        for k, v in envoy_stats(pool.envoy_admin, r"^cluster\.ext_authz\.").items()
        if v and "bytes" not in k
    }
    assert set(results) == {200}, ({s: results.count(s) for s in set(results)}, stats)
    assert stats.get("cluster.ext_authz.upstream_rq_retry_success", 0) >= 1, stats  # Envoy retried
    assert 'sidecar_authz_worker_restarts_total{worker="' in pool.metrics()
    assert "exited with signal SIGKILL; restarting" in pool.parent.log_text()


def test_sigterm_to_the_parent_stops_every_worker(tmp_path: Path, pool: Pool) -> None:
    # Runs last in this module: the module's pool is stopped here, by the parent alone.
    workers = pool.worker_pids()
    runtime = re.findall(r"sidecar-authz-[a-z0-9_]+", pool.parent.log_text())
    os.kill(pool.parent.pid, signal.SIGTERM)  # not the process group: the parent forwards it
    deadline = time.monotonic() + 15
    while pool.parent.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.parent.returncode == 0, pool.parent.log_text(tail=3000)
    assert not [pid for pid in workers if _alive(pid)], "a worker outlived its parent"
    for name in runtime:
        assert not Path("/dev/shm", name).exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
