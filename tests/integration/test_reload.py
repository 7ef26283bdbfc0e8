"""Reloading a running process's configuration (SIGHUP, ``--watch-config``), and the one
lifecycle under real signals: ``sidecar authz`` behind the real Envoy under load, its workers,
``sidecar run`` and ``sidecar broker``; a start-up failure still stops what had started."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.envoy_config import ingress_bootstrap
from tests.integration.harness import (
    ManagedProcess,
    free_port,
    free_port_pair,
    http_request,
    start_echo_app,
    start_envoy,
    wait_for_http,
)
from tests.integration.issuer import AUDIENCE, FRONTEND, DevIssuer, client_signer
from tests.integration.live_metrics import check_live_metrics, sample

ORDERS_ONLY = [{"name": "orders", "principals": [FRONTEND], "paths": ["/orders", "/nonce"]}]
WITH_REPORTS = [*ORDERS_ONLY, {"name": "reports", "principals": [FRONTEND], "paths": ["/reports"]}]


def _authz(issuer: DevIssuer, tmp: Path, grpc: str, http: str, rules: list[Any]) -> dict[str, Any]:
    jwks = str(issuer.write_jwks(tmp / "jwks.json"))
    return {
        "audience": AUDIENCE,
        "issuers": [{"issuer": issuer.issuer, "jwks_file": jwks}],
        "grpc": {"listen": grpc},
        "http": {"listen": http},
        "nonce": {"secret": "reload-test-nonce-secret"},
        "routes": [{"prefix": "/bearer", "auth": "bearer"}],
        "rules": rules,
    }


@dataclass
class Running:
    """A process whose config file the test rewrites, and its admin port."""

    process: ManagedProcess
    config_path: Path
    config: dict[str, Any]
    admin_port: int

    def metrics(self) -> str:
        status, _, body = http_request(f"http://127.0.0.1:{self.admin_port}/metrics")
        assert status == 200
        return body.decode()

    def reloads(self, result: str, **labels: str) -> float:
        return sample(self.metrics(), "sidecar_config_reloads_total", result=result, **labels) or 0

    def write(self, change: Callable[[dict[str, Any]], None] | None = None) -> str:
        """Rewrite the file (``change`` applied to a copy of the config); its SHA-256."""
        cfg = copy.deepcopy(self.config)
        if change is not None:
            change(cfg)
        text = yaml.safe_dump(cfg)
        self.config_path.write_text(text)
        return hashlib.sha256(text.encode()).hexdigest()

    def sighup_and_wait(self, result: str, pid: int | None = None, **labels: str) -> None:
        before = self.reloads(result, **labels)
        os.kill(pid or self.process.pid, signal.SIGHUP)
        self.wait_reloads(result, before + 1, **labels)

    def wait_reloads(self, result: str, count: float, **labels: str) -> None:
        timeout = 15.0
        deadline = time.monotonic() + timeout
        while self.reloads(result, **labels) < count:
            self.process.assert_running()
            assert time.monotonic() < deadline, (result, self.process.log_text(tail=20))
            time.sleep(0.05)


def _set_rules(rules: list[Any]) -> Callable[[dict[str, Any]], None]:
    def change(cfg: dict[str, Any]) -> None:
        cfg["authz"]["rules"] = rules

    return change


def _dpop(issuer: DevIssuer, url: str) -> dict[str, str]:
    signer = client_signer()
    token = issuer.token(sub=FRONTEND, jkt=signer.thumbprint)
    proof = signer.proof(method="GET", url=url, now=time.time(), access_token=token)
    return {"Authorization": f"DPoP {token}", "DPoP": proof}


@dataclass
class Stack:
    authz: Running
    issuer: DevIssuer
    envoy_port: int

    def get(self, path: str) -> tuple[int, str | None]:
        url = f"http://127.0.0.1:{self.envoy_port}{path}"
        status, headers, _ = http_request(url, headers=_dpop(self.issuer, url))
        return status, headers.get("x-authz-reason")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("reload")
    issuer = DevIssuer()
    grpc_port, http_port, admin_port = free_port(), free_port(), free_port()
    app_port, envoy_port, envoy_admin = free_port(), free_port(), free_port()
    config = {
        "authz": _authz(
            issuer, tmp, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}", ORDERS_ONLY
        ),
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
    }
    path = tmp / "authz.yaml"
    path.write_text(yaml.safe_dump(config))
    app = start_echo_app(app_port, tmp, name="reload-app", access_log=False)
    authz = ManagedProcess(
        [sys.executable, "-m", "sidecar", "authz", "-c", str(path)], name="authz", log_dir=tmp
    ).start()
    envoy = None
    try:
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
        yield Stack(Running(authz, path, config, admin_port), issuer, envoy_port)
    finally:
        for proc in (envoy, authz, app):
            if proc is not None:
                proc.stop()


def test_sighup_swaps_the_policy_under_load_without_a_failed_request(stack: Stack) -> None:
    authz = stack.authz
    assert stack.get("/reports/1") == (403, "policy_denied")
    first_sha = authz.write()
    assert sample(authz.metrics(), "sidecar_config_info", sha256=first_sha) == 1
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            statuses.append(stack.get("/orders/1")[0])

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        for rules in (WITH_REPORTS, ORDERS_ONLY, WITH_REPORTS):  # three swaps under load
            new_sha = authz.write(_set_rules(rules))
            authz.sighup_and_wait("ok")
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(statuses) > 20
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    authz.process.assert_running()  # SIGHUP used to kill it (exit 129)
    assert stack.get("/reports/1") == (200, None)  # the new policy is in force
    page = check_live_metrics(f"http://127.0.0.1:{authz.admin_port}/metrics")
    assert sample(page, "sidecar_config_info", sha256=new_sha) == 1
    assert sample(page, "sidecar_config_info", sha256=first_sha) is None
    assert "config reloaded sha256=" + new_sha[:16] in authz.process.log_text()


def test_an_invalid_config_is_refused_and_the_old_policy_still_applies(stack: Stack) -> None:
    authz = stack.authz
    authz.write(_set_rules(ORDERS_ONLY))
    authz.sighup_and_wait("ok")
    assert stack.get("/reports/1") == (403, "policy_denied")
    running_sha = authz.write(_set_rules(ORDERS_ONLY))

    def invalid(cfg: dict[str, Any]) -> None:
        cfg["authz"]["rules"] = WITH_REPORTS
        cfg["authz"]["leeway"] = "soon"  # one mistake: the whole file is refused

    authz.write(invalid)
    authz.sighup_and_wait("error")
    log = authz.process.log_text(tail=2000)
    assert "config reload refused" in log and "authz.leeway" in log, log
    assert stack.get("/reports/1") == (403, "policy_denied")  # not half applied
    assert stack.get("/orders/1") == (200, None)
    assert sample(authz.metrics(), "sidecar_config_info", sha256=running_sha) == 1


def test_a_listener_change_is_refused_as_needing_a_restart(stack: Stack) -> None:
    authz = stack.authz

    def moved(cfg: dict[str, Any]) -> None:
        cfg["authz"]["rules"] = WITH_REPORTS
        cfg["authz"]["grpc"]["listen"] = f"127.0.0.1:{free_port()}"

    authz.write(moved)
    authz.sighup_and_wait("error")
    assert "needs restart: authz.grpc.listen" in authz.process.log_text(tail=2000)
    assert stack.get("/orders/1") == (200, None)  # still served on the old listener
    assert stack.get("/reports/1") == (403, "policy_denied")


def _http_check(issuer: DevIssuer, port: int, path: str) -> tuple[int, str | None]:
    """A check straight at an HTTP ext_authz listener (no Envoy): Host names the service."""
    url = f"http://orders.local{path}"
    headers = {"Host": "orders.local", **_dpop(issuer, url)}
    status, hdrs, _ = http_request(f"http://127.0.0.1:{port}{path}", headers=headers)
    return status, hdrs.get("x-authz-reason")


def _wait_for(check: Callable[[], object], expected: object, process: ManagedProcess) -> None:
    deadline = time.monotonic() + 15
    while (got := check()) != expected:
        process.assert_running()
        assert time.monotonic() < deadline, (got, process.log_text(tail=20))
        time.sleep(0.1)


@contextlib.contextmanager
def _http_only(tmp: Path, issuer: DevIssuer, *command: str) -> Iterator[tuple[Running, int]]:
    """``sidecar <command> -c FILE`` with an authz section on an HTTP port; (it, the port)."""
    http_port, admin_port = free_port(), free_port()
    config = {
        "authz": _authz(issuer, tmp, "127.0.0.1:0", f"127.0.0.1:{http_port}", ORDERS_ONLY),
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    args = [sys.executable, "-m", "sidecar", command[0], "-c", str(path), *command[1:]]
    with ManagedProcess(args, name=command[0], log_dir=tmp) as proc:
        wait_for_http(f"http://127.0.0.1:{admin_port}/readyz", 20, process=proc)
        yield Running(proc, path, config, admin_port), http_port


def test_watch_config_reloads_when_the_file_changes(tmp_path: Path) -> None:
    issuer = DevIssuer()
    with _http_only(tmp_path, issuer, "authz", "--watch-config", "0.2") as (running, http_port):
        proc = running.process
        assert _http_check(issuer, http_port, "/reports/1") == (403, "policy_denied")
        running.write(_set_rules(WITH_REPORTS))  # no signal: the watch sees it
        _wait_for(lambda: _http_check(issuer, http_port, "/reports/1"), (200, None), proc)
        assert running.reloads("ok") == 1
        time.sleep(0.6)  # unchanged file: no further reload
        assert running.reloads("ok") == 1


def test_workers_reload_what_the_parent_forwards(tmp_path: Path) -> None:
    issuer = DevIssuer()
    grpc_base, http_base, admin_port = free_port_pair(), free_port_pair(), free_port()
    authz = _authz(
        issuer, tmp_path, f"127.0.0.1:{grpc_base}", f"127.0.0.1:{http_base}", ORDERS_ONLY
    )
    del authz["nonce"]  # the parent's generated secret must survive the reload
    authz["workers"] = 2
    authz["routes"].append({"prefix": "/nonce", "auth": "dpop", "nonce": True})
    config = {"authz": authz, "admin": {"listen": f"127.0.0.1:{admin_port}"}}
    path = tmp_path / "authz.yaml"
    path.write_text(yaml.safe_dump(config))
    args = [sys.executable, "-m", "sidecar", "authz", "-c", str(path)]
    with ManagedProcess(args, name="authz-workers-reload", log_dir=tmp_path) as proc:
        wait_for_http(f"http://127.0.0.1:{admin_port}/readyz", 30, process=proc)
        running = Running(proc, path, config, admin_port)
        for index in (0, 1):
            assert _http_check(issuer, http_base + index, "/reports/1") == (403, "policy_denied")
        _, nonce_headers, _ = http_request(
            f"http://127.0.0.1:{http_base}/nonce/1",
            headers={"Host": "orders.local", **_dpop(issuer, "http://orders.local/nonce/1")},
        )
        nonce = nonce_headers["dpop-nonce"]
        new_sha = running.write(_set_rules(WITH_REPORTS))
        running.sighup_and_wait("ok")  # the parent validated and forwarded it
        for index in (0, 1):
            check = functools.partial(_http_check, issuer, http_base + index, "/reports/1")
            _wait_for(check, (200, None), proc)
            running.wait_reloads("ok", 1, worker=str(index))
        page = running.metrics()
        for index in (0, 1):
            assert sample(page, "sidecar_config_info", sha256=new_sha, worker=str(index)) == 1
        # A nonce issued before the reload is still honoured (same generated secret).
        signer = client_signer()
        token = issuer.token(sub=FRONTEND, jkt=signer.thumbprint)
        url = "http://orders.local/nonce/1"
        proof = signer.proof(
            method="GET", url=url, now=time.time(), access_token=token, nonce=nonce
        )
        status, hdrs, _ = http_request(
            f"http://127.0.0.1:{http_base + 1}/nonce/1",
            headers={"Host": "orders.local", "Authorization": f"DPoP {token}", "DPoP": proof},
        )
        assert status == 200, hdrs
        # A worker sent SIGHUP directly ignores it (only the parent acts on it).
        pgrep = ["pgrep", "-P", str(proc.pid)]
        worker = int(subprocess.run(pgrep, capture_output=True, text=True).stdout.split()[0])
        os.kill(worker, signal.SIGHUP)
        time.sleep(0.3)
        os.kill(worker, 0)  # still alive
        proc.assert_running()
        assert proc.stop() == 0


def test_sighup_reloads_sidecar_run_and_does_not_kill_it(tmp_path: Path) -> None:
    issuer = DevIssuer()
    with _http_only(tmp_path, issuer, "run") as (running, http_port):
        proc = running.process
        assert _http_check(issuer, http_port, "/reports/1") == (403, "policy_denied")
        running.write(_set_rules(WITH_REPORTS))
        running.sighup_and_wait("ok")
        assert _http_check(issuer, http_port, "/reports/1") == (200, None)

        def moved_admin(cfg: dict[str, Any]) -> None:
            cfg["admin"]["listen"] = f"127.0.0.1:{free_port()}"

        running.write(moved_admin)
        running.sighup_and_wait("error")
        assert "needs restart: admin" in proc.log_text(tail=2000)
        assert proc.stop() == 0  # SIGTERM: a clean exit


def test_sighup_reloads_the_broker_and_does_not_kill_it(tmp_path: Path) -> None:
    from tests.integration.broker_process import BrokerProcess

    broker = BrokerProcess(tmp_path, entries=[]).start()
    try:
        running = Running(broker.process, broker.config_path, {}, broker.admin_port)
        running.sighup_and_wait("ok")  # the same file: swapped in, nothing refused
        broker.process.assert_running()
    finally:
        assert broker.process.stop() == 0


def test_a_start_up_failure_still_stops_what_had_started(tmp_path: Path) -> None:
    """The admin port is free when the listeners are checked, and taken (by this test) while the
    authorizer waits for its issuer's keys; the authorizer then binds its listeners and the
    admin listener fails. The process exits, and the authorizer it had started is stopped (its
    unix socket removed), not abandoned."""
    grpc_socket = tmp_path / "grpc.sock"
    issuer = socket.socket()  # accepts the key fetch and never answers it (a 5 s wait)
    issuer.bind(("127.0.0.1", 0))
    issuer.listen()
    issuer.settimeout(30)
    admin_port = free_port()
    authz = _authz(DevIssuer(), tmp_path, f"unix:{grpc_socket}", "127.0.0.1:0", ORDERS_ONLY)
    authz["issuers"] = [
        {
            "issuer": "http://issuer.test",
            "jwks_uri": f"http://127.0.0.1:{issuer.getsockname()[1]}/k",
        }
    ]
    path = tmp_path / "authz.yaml"
    path.write_text(
        yaml.safe_dump({"authz": authz, "admin": {"listen": f"127.0.0.1:{admin_port}"}})
    )
    taken = socket.socket()
    proc = ManagedProcess(
        [sys.executable, "-m", "sidecar", "authz", "-c", str(path)],
        name="authz-startup-failure",
        log_dir=tmp_path,
    ).start()
    try:
        fetch, _ = issuer.accept()  # the listener check has passed: the service is starting
        taken.bind(("127.0.0.1", admin_port))
        taken.listen()
        deadline = time.monotonic() + 30
        while proc.is_running():
            assert time.monotonic() < deadline, proc.log_text(tail=2000)
            time.sleep(0.05)
        fetch.close()
        assert proc.returncode not in (0, None)
        assert str(admin_port) in proc.log_text(tail=2000)  # it failed on the admin listener
        assert not grpc_socket.exists(), "the started gRPC listener was not stopped"
    finally:
        proc.stop()
        taken.close()
        issuer.close()
