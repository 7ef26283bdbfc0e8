"""Connection limits on every listener (issue 14 item 8), against real processes over real
sockets:

* a request head or body sent a byte at a time (slow-loris), a silent connection and an idle
  keep-alive connection are cut within the configured timeouts on the egress listener, the HTTP
  ext_authz port, the broker's HTTP port and attestation socket, and the admin port;
* one local user holding many attestation connections does not stop another user (a child
  process run as uid 65534) from getting its token;
* the egress out of file descriptors (RLIMIT_NOFILE lowered in its process) says so in its log
  and its metrics, with uvloop and with asyncio's own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from sidecar.net_limits import ConnLimits
from sidecar.observability.admin import make_admin_app
from sidecar.runtime import start_admin_site
from tests.integration.broker_process import (
    TRUST,
    BrokerProcess,
    new_signer,
    python_entries,
)
from tests.integration.harness import (
    REPO_ROOT,
    ManagedProcess,
    free_port,
    http_request,
    wait_for_http,
)
from tests.integration.issuer import AUDIENCE, DevIssuer

ORDERS = f"{TRUST}/ns/shop/sa/orders"
NOBODY = 65534
HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
IDLE_TIMEOUT = 1.0
SHORT = {
    "max_connections": 32,
    "header_timeout": HEADER_TIMEOUT,
    "body_timeout": BODY_TIMEOUT,
    "idle_timeout": IDLE_TIMEOUT,
}
#: Sweep granularity (a quarter of the shortest timeout) plus scheduling on a loaded machine.
SLACK = 1.5


# -- clients --------------------------------------------------------------------------------------

Connect = Callable[[], socket.socket]


def tcp(port: int) -> Connect:
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=5)


def unix(path: str) -> Connect:
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(path)
        return sock

    return connect


def seconds_until_closed(sock: socket.socket, drip: bytes, limit: float) -> float:
    """Send ``drip`` one byte every 50 ms (nothing if empty) until the server closes the
    connection; the seconds that took. Fails if it is still open after ``limit``."""
    start = time.monotonic()
    sock.settimeout(0.05)
    i = 0
    while time.monotonic() - start < limit:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            pass
        except ConnectionError:
            return time.monotonic() - start
        if drip:
            try:
                sock.send(drip[i % len(drip) : i % len(drip) + 1])
            except ConnectionError:
                return time.monotonic() - start
            i += 1
    raise AssertionError(f"the connection is still open after {limit:.1f} s")


def read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response with a Content-Length (all our servers send one)."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return head


def check_cuts(connect: Connect, request: bytes) -> dict[str, float]:
    """The four ways of holding a connection; each must be cut near its timeout."""
    took = {}
    with contextlib.closing(connect()) as sock:  # says nothing at all
        took["silent"] = seconds_until_closed(sock, b"", HEADER_TIMEOUT + SLACK + 2)
    with contextlib.closing(connect()) as sock:  # a head that never ends, dripped
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        took["head"] = seconds_until_closed(sock, b"X-Slow: 1\r\n", HEADER_TIMEOUT + SLACK + 2)
    with contextlib.closing(connect()) as sock:  # a body that never ends, dripped
        sock.sendall(
            b"POST /token HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
        )
        took["body"] = seconds_until_closed(sock, b"a=b&", BODY_TIMEOUT + SLACK + 2)
    with contextlib.closing(connect()) as sock:  # one request, then idle keep-alive
        sock.sendall(request)
        read_response(sock)
        took["idle"] = seconds_until_closed(sock, b"", IDLE_TIMEOUT + SLACK + 2)
    for case, limit in (
        ("silent", HEADER_TIMEOUT),
        ("head", HEADER_TIMEOUT),
        ("body", BODY_TIMEOUT),
        ("idle", IDLE_TIMEOUT),
    ):
        # Not at once (it is the timeout that cuts), and not much later than it.
        assert limit * 0.8 <= took[case] <= limit + SLACK, (case, took)
    return took


def metric(admin_port: int, name: str, **labels: str) -> float:
    status, _, body = http_request(f"http://127.0.0.1:{admin_port}/metrics")
    assert status == 200
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in body.decode().splitlines():
        series, _, value = line.rpartition(" ")
        if series == (f"{name}{{{want}}}" if labels else name):
            return float(value)
    return 0.0


# -- the broker: HTTP port and attestation socket -------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    tmp = tmp_path_factory.mktemp("broker-limits")
    proc = BrokerProcess(
        tmp,
        entries=python_entries(),
        extra={"connections": SHORT},
    )
    cfg = yaml.safe_load(proc.config_path.read_text())
    cfg["attestation"]["connections"] = {**SHORT, "max_per_uid": 8}
    proc.config_path.write_text(yaml.safe_dump(cfg))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def test_broker_http_port_cuts_slow_and_idle_connections(broker: BrokerProcess) -> None:
    took = check_cuts(tcp(broker.port), b"GET /jwks.json HTTP/1.1\r\nHost: localhost\r\n\r\n")
    print("broker http", took)
    assert (
        metric(
            broker.admin_port,
            "sidecar_connections_timed_out_total",
            listener="broker_http",
            reason="header_timeout",
        )
        >= 2
    )
    assert (
        metric(
            broker.admin_port,
            "sidecar_connections_timed_out_total",
            listener="broker_http",
            reason="body_timeout",
        )
        >= 1
    )


def test_attestation_socket_cuts_slow_and_idle_connections(broker: BrokerProcess) -> None:
    took = check_cuts(unix(broker.socket), b"GET /token HTTP/1.1\r\nHost: localhost\r\n\r\n")
    print("attestation", took)
    assert (
        metric(
            broker.admin_port,
            "sidecar_connections_timed_out_total",
            listener="broker_attestation",
            reason="header_timeout",
        )
        >= 2
    )
    # Every held connection is gone (each held a pidfd too), and tokens are still issued.
    assert metric(broker.admin_port, "sidecar_connections_open", listener="broker_attestation") == 0
    assert broker.unix_token([ORDERS]).status == 200


# -- one user holding the attestation socket ------------------------------------------------------


CHILD = r"""
import socket, sys, urllib.parse
path, audience, proof = sys.argv[1:4]
body = urllib.parse.urlencode({"audience": audience}).encode()
head = (
    "POST /token HTTP/1.1\r\nHost: localhost\r\n"
    "Content-Type: application/x-www-form-urlencoded\r\n"
    f"Content-Length: {len(body)}\r\nDPoP: {proof}\r\nConnection: close\r\n\r\n"
)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(path)
s.sendall(head.encode() + body)
data = b""
while chunk := s.recv(65536):
    data += chunk
sys.stdout.write(data.decode())
"""


def python_for(uid: int) -> str | None:
    """An interpreter ``uid`` may run (ours may live under root's 0700 home)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            run = subprocess.run([candidate, "-I", "-c", "0"], user=uid, timeout=30, check=False)
            if run.returncode == 0:
                return candidate
    return None


def token_as(uid: int, path: str) -> str:
    """``POST /token`` on the socket from a process running as ``uid`` (stdlib only)."""
    python = python_for(uid)
    if python is None:
        pytest.skip(f"no Python interpreter that uid {uid} may run")
    proof = new_signer().proof(method="POST", url="http://localhost/token", now=time.time())
    out = subprocess.run(
        [python, "-I", "-c", CHILD, path, ORDERS, proof],
        user=uid,
        group=uid,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another uid")
def test_one_uid_holding_connections_does_not_starve_another(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tmp = tmp_path_factory.mktemp("per-uid")
    # A socket directory the other user can reach (pytest's tmp is 0700).
    shared = tempfile.mkdtemp(prefix="conn-limits-", dir="/tmp")
    os.chmod(shared, 0o755)
    per_uid, total, held = 4, 16, 40
    proc = BrokerProcess(
        tmp,
        entries=[
            *python_entries(),
            {
                "spiffe_id": f"{TRUST}/unix/nobody",
                "selectors": [f"unix:uid:{NOBODY}"],
                "audiences": [ORDERS],
            },
        ],
    )
    cfg = yaml.safe_load(proc.config_path.read_text())
    proc.socket = cfg["attestation"]["socket"] = f"{shared}/attestation.sock"
    cfg["attestation"]["connections"] = {
        "max_connections": total,
        "max_per_uid": per_uid,
        "header_timeout": 60,
    }
    proc.config_path.write_text(yaml.safe_dump(cfg))
    proc.start()
    socks: list[socket.socket] = []
    try:
        assert "access_token" in token_as(NOBODY, proc.socket)
        # This process (root) opens far more connections than its share, and holds them.
        refused = 0
        for _ in range(held):
            sock = unix(proc.socket)()
            socks.append(sock)
            sock.settimeout(0.3)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue  # admitted: the server waits for our request
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b'"error": "temporarily_unavailable"' in answer
            assert b"X-Sidecar-Error: too_many_connections" in answer
            refused += 1
        assert refused == held - per_uid
        assert (
            metric(proc.admin_port, "sidecar_connections_open", listener="broker_attestation")
            == per_uid
        )
        assert (
            metric(
                proc.admin_port,
                "sidecar_connections_rejected_total",
                listener="broker_attestation",
                reason="max_per_uid",
            )
            == refused
        )
        # Root's share is used up: its next request is refused, clearly...
        with contextlib.closing(unix(proc.socket)()) as sock:
            assert sock.recv(65536).startswith(b"HTTP/1.1 503 ")
        # ...while another user's workload still gets its token.
        reply = token_as(NOBODY, proc.socket)
        assert reply.startswith("HTTP/1.1 200 "), reply
        assert "access_token" in reply
        assert "connection refused: max_per_uid (4 open by uid 0)" in proc.process.log_text()
        for sock in socks:
            sock.close()
        socks.clear()
        deadline = time.monotonic() + 5
        while metric(proc.admin_port, "sidecar_connections_open", listener="broker_attestation"):
            assert time.monotonic() < deadline, "closed connections are still counted"
            time.sleep(0.05)
        assert proc.unix_token([ORDERS]).status == 200
    finally:
        for sock in socks:
            sock.close()
        proc.stop()
        shutil.rmtree(shared, ignore_errors=True)


# -- sidecar run: the egress listener and the HTTP ext_authz port ---------------------------------


class Sidecar:
    def __init__(
        self,
        tmp: Path,
        *,
        egress_connections: dict[str, Any],
        env: dict[str, str],
        nofile: int | None = None,
        authz: bool = True,
    ) -> None:
        self.egress_port, self.authz_port, self.admin_port = free_port(), free_port(), free_port()
        issuer = DevIssuer()
        token_file = tmp / "token.jwt"
        token_file.write_text(issuer.token(ttl=3600))
        cfg: dict[str, Any] = {
            "identity": {"attestor": {"type": "file", "path": str(token_file)}},
            "egress": {
                "upstreams": [
                    {
                        "name": "orders",
                        "listen": f"127.0.0.1:{self.egress_port}",
                        "upstream": f"http://127.0.0.1:{free_port()}",
                        "audience": AUDIENCE,
                    },
                ],
                "connections": egress_connections,
            },
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
        }
        if authz:
            cfg["authz"] = {
                "audience": AUDIENCE,
                "issuers": [
                    {
                        "issuer": issuer.issuer,
                        "jwks_file": str(issuer.write_jwks(tmp / "jwks.json")),
                    }
                ],
                "grpc": {"enabled": False},
                "http": {"listen": f"127.0.0.1:{self.authz_port}", "connections": SHORT},
                "routes": [{"prefix": "/"}],
                "rules": [{"principals": ["**"]}],
            }
        path = tmp / "sidecar.yaml"
        path.write_text(yaml.safe_dump(cfg))
        args = [sys.executable, "-m", "sidecar", "run", "-c", str(path)]
        if nofile is not None:
            # The process's own limit, soft and hard (so it cannot raise it back).
            args = [
                sys.executable,
                "-c",
                "import resource, runpy, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); "
                f"sys.argv = ['sidecar', 'run', '-c', {str(path)!r}]; "
                "runpy.run_module('sidecar', run_name='__main__', alter_sys=True)",
            ]
        self.process = ManagedProcess(
            args, name="sidecar-limits", log_dir=tmp, cwd=REPO_ROOT, env=env
        )

    def start(self) -> Sidecar:
        self.process.start()
        try:
            wait_for_http(f"http://127.0.0.1:{self.admin_port}/readyz", 20, process=self.process)
        except BaseException:
            self.process.stop()
            raise
        return self


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    proc = Sidecar(tmp_path_factory.mktemp("sidecar-limits"), egress_connections=SHORT, env={})
    proc.start()
    try:
        yield proc
    finally:
        proc.process.stop()


def test_egress_listener_cuts_slow_and_idle_connections(sidecar: Sidecar) -> None:
    # The upstream is down: the request is answered 502 upstream_unreachable at once.
    took = check_cuts(tcp(sidecar.egress_port), b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    print("egress", took)
    assert (
        metric(
            sidecar.admin_port,
            "sidecar_connections_timed_out_total",
            listener="egress:orders",
            reason="header_timeout",
        )
        >= 2
    )


def test_authz_http_port_cuts_slow_and_idle_connections(sidecar: Sidecar) -> None:
    # No credentials: denied at once.
    took = check_cuts(tcp(sidecar.authz_port), b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    print("authz http", took)
    assert (
        metric(
            sidecar.admin_port,
            "sidecar_connections_timed_out_total",
            listener="authz_http",
            reason="body_timeout",
        )
        >= 1
    )


def test_egress_listener_connection_cap(sidecar: Sidecar) -> None:
    cap = int(SHORT["max_connections"])
    socks = [tcp(sidecar.egress_port)() for _ in range(cap)]
    try:
        # One more than the cap: a clear 503, then the connection is closed.
        with contextlib.closing(tcp(sidecar.egress_port)()) as extra:
            answer = extra.recv(65536)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"X-Sidecar-Error: too_many_connections" in answer
        assert (
            metric(
                sidecar.admin_port,
                "sidecar_connections_rejected_total",
                listener="egress:orders",
                reason="max_connections",
            )
            >= 1
        )
    finally:
        for sock in socks:
            sock.close()


def test_egress_body_without_deadline_is_cut_only_when_it_stops(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The egress default (``body_timeout: 0``): an upload may take any time while it flows;
    one that stops for ``idle_timeout`` is cut."""
    proc = Sidecar(
        tmp_path_factory.mktemp("egress-upload"),
        egress_connections={"header_timeout": HEADER_TIMEOUT, "idle_timeout": IDLE_TIMEOUT},
        env={},
        authz=False,
    ).start()
    try:
        with contextlib.closing(tcp(proc.egress_port)()) as sock:
            sock.sendall(b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n")
            flowing = time.monotonic()
            with pytest.raises(AssertionError, match="still open"):
                seconds_until_closed(sock, b"abcd", 3 * IDLE_TIMEOUT)  # flows past every timeout
            assert time.monotonic() - flowing >= 3 * IDLE_TIMEOUT
            took = seconds_until_closed(sock, b"", IDLE_TIMEOUT + SLACK + 2)  # stops
            assert IDLE_TIMEOUT * 0.8 <= took <= IDLE_TIMEOUT + SLACK, took
        assert (
            metric(
                proc.admin_port,
                "sidecar_connections_timed_out_total",
                listener="egress:orders",
                reason="body_stalled",
            )
            == 1
        )
    finally:
        proc.process.stop()


# -- the admin port -------------------------------------------------------------------------------


def test_admin_port_cuts_slow_and_idle_connections() -> None:
    """``start_admin_site`` as every command uses it (with short limits instead of the fixed
    admin ones), serving on its own loop in a thread."""
    limits = ConnLimits(32, HEADER_TIMEOUT, BODY_TIMEOUT, IDLE_TIMEOUT)
    registry = CollectorRegistry()
    started = threading.Event()
    bound: list[int] = []
    stop: list[Callable[[], object]] = []

    async def serve() -> None:
        app = make_admin_app(registry, lambda: (True, "ready"))
        runner, port = await start_admin_site(app, "127.0.0.1", 0, registry, limits)
        bound.append(port)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        stop.append(lambda: loop.call_soon_threadsafe(done.set))
        started.set()
        await done.wait()
        await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        took = check_cuts(tcp(bound[0]), b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        print("admin", took)
        text = generate_latest(registry).decode()
        assert (
            'sidecar_connections_timed_out_total{listener="admin",reason="header_timeout"} 2.0'
            in text
        )
    finally:
        stop[0]()
        thread.join(10)


# -- out of file descriptors ----------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_egress_out_of_file_descriptors_is_logged_and_counted(
    tmp_path_factory: pytest.TempPathFactory, loop: str
) -> None:
    nofile = 64
    proc = Sidecar(
        tmp_path_factory.mktemp(f"emfile-{loop}"),
        egress_connections={"header_timeout": 60},  # held connections stay
        env={"SIDECAR_EVENT_LOOP": loop} if loop == "asyncio" else {},
        nofile=nofile,
        authz=False,
    ).start()
    socks: list[socket.socket] = []
    try:
        assert metric(proc.admin_port, "sidecar_fd_limit") == nofile
        assert metric(proc.admin_port, "sidecar_fd_exhausted_total") == 0
        # More connections than the process has descriptors left; the test's own are plenty.
        for _ in range(nofile):
            with contextlib.suppress(OSError):
                socks.append(socket.create_connection(("127.0.0.1", proc.egress_port), 2))
        deadline = time.monotonic() + 10
        while "out of file descriptors" not in proc.process.log_text():
            assert time.monotonic() < deadline, proc.process.log_text(tail=20)
            time.sleep(0.1)
        line = next(
            x for x in proc.process.log_text().splitlines() if "out of file descriptors" in x
        )
        assert f"limit {nofile}" in line and "WARNING" in line
        for sock in socks:
            sock.close()
        socks.clear()
        # Descriptors free again: the admin port answers, and the count is there.
        deadline = time.monotonic() + 10
        while True:
            try:
                exhausted = metric(proc.admin_port, "sidecar_fd_exhausted_total")
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert exhausted >= 1
        # And the listener serves again (the upstream is down: 502 from the proxy itself).
        status, headers, _ = http_request(f"http://127.0.0.1:{proc.egress_port}/x")
        assert status == 502 and headers.get("x-sidecar-error") == "upstream_unreachable"
        proc.process.assert_running()
        # One warning per 10 s, not one per refused connection.
        assert proc.process.log_text().count("out of file descriptors") <= 2
    finally:
        for sock in socks:
            sock.close()
        proc.process.stop()
