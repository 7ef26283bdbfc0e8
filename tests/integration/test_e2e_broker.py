"""End to end, all real processes on loopback:

    app A (http.client / urllib / curl: knows nothing about tokens)
      → sidecar A (`sidecar run`: unix attestation at the broker, egress proxy)
      → Envoy (ingress of B, ext_authz over gRPC)
      → sidecar B (`sidecar run` with only an `authz` section) → app B (the echo app)

    broker (`sidecar broker`): OIDC discovery + JWKS for B, the attestation socket for A.

Tokens live 4 s (the broker entry's ttl) and B verifies with ZERO leeway, so every 200 proves
the token was unexpired when B checked it. The outage test stops the broker, watches the proxy
keep serving until the cached token runs out, then answer 503 ``no_valid_token``, and resume
within about a second after the broker returns — with a bounded number of token requests.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry, generate_latest

from sidecar.egress.config import parse_egress_config
from sidecar.egress.proxy import EgressProxy
from sidecar.envoy_config import ingress_bootstrap
from sidecar.identity.attestors import UnixAttestor
from sidecar.identity.clock_offset import ClockOffsets
from sidecar.identity.key import generate_signer
from sidecar.identity.metrics import IdentityMetrics
from sidecar.identity.schedule import RefreshPolicy
from sidecar.identity.source import TokenSource
from tests.integration.harness import (
    REPO_ROOT,
    ManagedProcess,
    free_port,
    http_request,
    start_echo_app,
    start_envoy,
    wait_for_http,
)
from tests.integration.live_metrics import check_live_metrics

FRONTEND = "spiffe://demo.local/ns/shop/sa/frontend"
ORDERS = "spiffe://demo.local/ns/shop/sa/orders"
TTL = 4


@dataclass
class Stack:
    tmp: Path
    broker_cfg: Path
    broker_port: int
    broker: ManagedProcess
    sidecar_a: ManagedProcess
    a_port: int
    a_admin: int
    b_admin: int
    envoy_port: int
    processes: list[ManagedProcess] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.a_port}{path}"

    def start_broker(self, name: str, audit: Path) -> ManagedProcess:
        proc = ManagedProcess(
            [sys.executable, "-m", "sidecar", "broker", "-c", str(self.broker_cfg)],
            name=name,
            log_dir=self.tmp,
            cwd=REPO_ROOT,
            env={"SIDECAR__AUDIT__PATH": str(audit)},
        ).start()
        self.processes.append(proc)
        wait_for_http(
            f"http://127.0.0.1:{self.broker_port}/.well-known/openid-configuration",
            15,
            process=proc,
        )
        return proc


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _key_file(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e")
    run_dir = tmp / "broker"  # short path: Unix socket paths are limited to 108 bytes
    run_dir.mkdir()
    broker_port, broker_admin = free_port(), free_port()
    a_port, a_admin = free_port(), free_port()
    b_grpc, b_admin = free_port(), free_port()
    app_port, envoy_port, envoy_admin = free_port(), free_port(), free_port()
    issuer = f"http://127.0.0.1:{broker_port}"
    broker_cfg = _write(
        tmp / "broker.yaml",
        {
            "issuer": issuer,
            "listen": f"127.0.0.1:{broker_port}",
            # A key file: the restarted broker signs with the same key as before.
            "keys": {"key_file": str(_key_file(tmp / "broker-key.pem")), "rotate_every": 0},
            "attestation": {"socket": str(run_dir / "attest.sock")},
            "admin": {"listen": f"127.0.0.1:{broker_admin}", "socket": str(run_dir / "admin.sock")},
            "entries": [
                {
                    "spiffe_id": FRONTEND,
                    "selectors": [f"unix:uid:{os.getuid()}"],
                    "audiences": [ORDERS],
                    "ttl": TTL,
                }
            ],
        },
    )
    a_cfg = _write(
        tmp / "sidecar-a.yaml",
        {
            "identity": {
                "issuer": issuer,
                "attestor": {"type": "unix", "socket": str(run_dir / "attest.sock")},
                "refresh": {"backoff_initial": 0.2, "backoff_max": 1.0, "demand_interval": 0.5},
            },
            "egress": {
                "upstreams": [
                    {
                        "name": "orders",
                        "listen": f"127.0.0.1:{a_port}",
                        "upstream": f"http://127.0.0.1:{envoy_port}",
                        "audience": ORDERS,
                    }
                ]
            },
            "admin": {"listen": f"127.0.0.1:{a_admin}"},
        },
    )
    b_cfg = _write(
        tmp / "sidecar-b.yaml",
        {
            "authz": {
                "audience": ORDERS,
                "issuers": [{"issuer": issuer, "discovery": True, "algorithms": ["ES256"]}],
                "leeway": 0,  # every allowed request had an unexpired token
                "grpc": {"listen": f"127.0.0.1:{b_grpc}"},
                "http": {"enabled": False},
                "nonce": {"secret": "e2e-test-nonce-secret-0123456789"},
                "routes": [{"prefix": "/nonce", "auth": "dpop", "nonce": True}],
                "rules": [
                    {
                        "name": "frontend-orders",
                        "principals": [FRONTEND],
                        "methods": ["GET", "POST"],
                        "paths": ["/orders", "/nonce"],
                    }
                ],
            },
            "admin": {"listen": f"127.0.0.1:{b_admin}"},
        },
    )
    st = Stack(tmp, broker_cfg, broker_port, None, None, a_port, a_admin, b_admin, envoy_port)  # type: ignore[arg-type]
    try:
        st.broker = st.start_broker("broker", tmp / "audit-1.log")
        app = start_echo_app(app_port, tmp, name="orders")
        st.processes.append(app)
        sidecar_b = ManagedProcess(
            [sys.executable, "-m", "sidecar", "run", "-c", str(b_cfg)],
            name="sidecar-b",
            log_dir=tmp,
            cwd=REPO_ROOT,
        ).start()
        st.processes.append(sidecar_b)
        st.sidecar_a = ManagedProcess(
            [sys.executable, "-m", "sidecar", "run", "-c", str(a_cfg)],
            name="sidecar-a",
            log_dir=tmp,
            cwd=REPO_ROOT,
        ).start()
        st.processes.append(st.sidecar_a)
        wait_for_http(f"http://127.0.0.1:{b_admin}/readyz", 20, process=sidecar_b)
        envoy = start_envoy(
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
        st.processes.append(envoy)
        wait_for_http(f"http://127.0.0.1:{a_admin}/readyz", 20, process=st.sidecar_a)
        yield st
    finally:
        for proc in reversed(st.processes):
            proc.stop()


# -- the app's side ---------------------------------------------------------------------------


class App:
    """A legacy HTTP/1.1 client: one keep-alive connection, reconnecting when it drops."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self.conn.request("GET", path)
                resp = self.conn.getresponse()
                body = resp.read()
                break
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        return resp.status, json.loads(body) if body else {}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


@dataclass
class Traffic:
    """Requests back to back on a thread; every result kept with its time."""

    port: int
    results: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        app = App(self.port)
        try:
            i = 0
            while not self.stop.is_set():
                i += 1
                status, body = app.get(f"/orders/{i}")
                self.results.append((time.monotonic(), status, body))
        finally:
            app.close()

    def __enter__(self) -> Traffic:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(15)


def metric_sum(port: int, name: str) -> float:
    _, _, body = http_request(f"http://127.0.0.1:{port}/metrics")
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(body.decode()))


def issuances(audit: Path) -> list[dict[str, Any]]:
    if not audit.exists():
        return []
    events = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    return [e for e in events if e.get("event") == "issuance" and e.get("result") == "ok"]


def assert_reached_b_as_a(status: int, body: dict[str, Any]) -> None:
    assert status == 200, body
    assert body["app"] == "orders"
    seen = body["headers"]
    assert seen["x-workload-id"] == FRONTEND
    assert seen["x-workload-auth"] == "dpop"
    assert "authorization" not in seen and "dpop" not in seen


# -- tests ------------------------------------------------------------------------------------


def test_unmodified_client_reaches_b_with_a_identity(stack: Stack) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(stack.url("/orders/42?expand=items"), timeout=10) as resp:
        body = json.loads(resp.read())
    assert_reached_b_as_a(resp.status, body)
    assert body["path"] == "/orders/42?expand=items"
    curl = shutil.which("curl")
    if curl:
        out = subprocess.run(
            [curl, "-sS", "--noproxy", "*", stack.url("/orders/43")],
            capture_output=True,
            timeout=15,
            check=True,
        )
        assert_reached_b_as_a(200, json.loads(out.stdout))


def test_live_metrics_of_both_sidecars_pass_promtool(stack: Stack) -> None:
    """``sidecar run`` with egress (A) and with ext_authz (B), after real traffic."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(stack.url("/orders/44"), timeout=10) as resp:
        assert resp.status == 200
    for port in (stack.a_admin, stack.b_admin):
        check_live_metrics(f"http://127.0.0.1:{port}/metrics")


def test_nonce_challenge_through_envoy_is_answered(stack: Stack) -> None:
    # B demands a nonce on /nonce: Envoy returns B's 401 use_dpop_nonce; sidecar A retries.
    app = App(stack.a_port)
    try:
        status, body = app.get("/nonce/1")
    finally:
        app.close()
    assert_reached_b_as_a(status, body)
    retries = metric_sum(stack.a_admin, "sidecar_egress_nonce_retries_total")
    assert retries >= 1


def test_sidecar_token_command_shows_claims_not_the_token(stack: Stack) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "token",
            "--audience",
            ORDERS,
            "-c",
            str(stack.tmp / "sidecar-a.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "running sidecar" in out.stdout and FRONTEND in out.stdout and "expires_at" in out.stdout
    assert not re.search(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+", out.stdout), "a token was printed"


def test_continuous_traffic_across_five_refresh_cycles(stack: Stack) -> None:
    audit = stack.tmp / "audit-1.log"
    before = len(issuances(audit))
    duration = 2.6 * TTL  # refresh at ~½ of the remaining lifetime: ~1.8 s per cycle
    with Traffic(stack.a_port) as traffic:
        time.sleep(duration)
    results = traffic.results
    assert len(results) > 100
    failures = [(s, b) for _, s, b in results if s != 200]
    assert not failures, f"{len(failures)} of {len(results)} failed, first: {failures[:3]}"
    for _, status, body in results:
        assert_reached_b_as_a(status, body)
    cycles = len(issuances(audit)) - before
    print(f"{len(results)} requests in {duration:.1f}s, all 200; {cycles} token refreshes")
    assert cycles >= 5, f"only {cycles} token refreshes in {duration:.1f}s"


async def _skewed_sidecar_calls(stack: Stack, skew: float) -> dict[str, Any]:
    """Sidecar A's parts in this process, on a clock ``skew`` seconds off (passed in, as the
    code does everywhere): a token from the real broker, then calls through egress → Envoy →
    sidecar B."""
    skewed = lambda: time.time() + skew  # noqa: E731
    offsets = ClockOffsets(skewed)
    registry = CollectorRegistry()
    metrics = IdentityMetrics(registry)
    metrics.watch_clock_offsets(offsets.snapshot)
    signer = generate_signer()
    socket_path = str(stack.tmp / "broker" / "attest.sock")
    tokens = TokenSource(
        UnixAttestor(socket_path, signer, clock=skewed, offsets=offsets),
        RefreshPolicy(),
        [ORDERS],
        metrics=metrics,
        clock=skewed,
    )
    upstream = f"http://127.0.0.1:{stack.envoy_port}"
    cfg = parse_egress_config(
        {
            "upstreams": [
                {
                    "name": "orders",
                    "listen": "127.0.0.1:0",
                    "upstream": upstream,
                    "audience": ORDERS,
                }
            ]
        }
    )
    proxy = EgressProxy(
        cfg, tokens=tokens, signer=signer, registry=registry, clock=skewed, offsets=offsets
    )
    await tokens.start()
    await proxy.start()
    answers = []
    try:
        token = await tokens.get(ORDERS)
        async with aiohttp.ClientSession() as session:
            for i in range(3):
                url = f"http://127.0.0.1:{proxy.ports['orders']}/orders/{i}"
                async with session.get(url) as resp:
                    answers.append((resp.status, await resp.json()))
    finally:
        await proxy.stop()
        await tokens.close()
    return {
        "token": token,
        "answers": answers,
        "broker_offset": offsets.offset(f"unix:{socket_path}"),
        "upstream_offset": offsets.offset(upstream),
        "metrics": generate_latest(registry).decode(),
    }


@pytest.mark.parametrize("skew", [30.0, -30.0])
def test_a_sidecar_with_a_skewed_clock_heals_itself(
    stack: Stack, skew: float, caplog: pytest.LogCaptureFixture
) -> None:
    # +30 s: the broker and B refuse every proof (iat beyond their 5 s leeway) until the
    # sidecar learns their clock from the refusal's Date and signs again. -30 s: inside their
    # 60 s max_age, accepted as before -- except by a B started less than ~35 s ago, whose
    # replay store refuses proofs that could predate its start (503 proof_predates_restart):
    # the sidecar then learns B's clock from that refusal the same way.
    caplog.set_level(logging.INFO)
    seen = asyncio.run(_skewed_sidecar_calls(stack, skew))
    assert seen["token"].claims["sub"] == FRONTEND
    for status, body in seen["answers"]:
        assert_reached_b_as_a(status, body)
    if skew > 0:
        for key in ("broker_offset", "upstream_offset"):
            assert seen[key] == pytest.approx(-skew, abs=1.5), (key, seen[key])
        assert re.search(
            r'sidecar_clock_offset_seconds\{peer="unix:[^"]+"\} -(29|30|31)\.', seen["metrics"]
        ), seen["metrics"]
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("clock offset peer=unix:" in m for m in warned), warned
        assert any(f"clock offset peer=http://127.0.0.1:{stack.envoy_port}" in m for m in warned)
    else:
        assert seen["broker_offset"] == 0.0, "nothing to correct"
        assert seen["upstream_offset"] in (0.0, pytest.approx(-skew, abs=1.5))


def test_broker_outage_then_recovery(stack: Stack) -> None:
    fetches_before = metric_sum(stack.a_admin, "sidecar_identity_token_fetches_total")
    with Traffic(stack.a_port) as traffic:
        time.sleep(0.5)
        stopped_at = time.monotonic()
        stack.broker.stop()
        # Traffic keeps flowing on the cached token, then 503 once it is no longer usable.
        deadline = stopped_at + TTL + 3
        while not any(s == 503 for _, s, _ in traffic.results) and time.monotonic() < deadline:
            time.sleep(0.05)
        first_503 = next((t for t, s, _ in traffic.results if s == 503), None)
        assert first_503 is not None, "the proxy kept serving past the token's expiry"
        time.sleep(1.5)  # an outage of a few seconds, under load
        outage_fetches = (
            metric_sum(stack.a_admin, "sidecar_identity_token_fetches_total") - fetches_before
        )
        audit2 = stack.tmp / "audit-2.log"
        stack.broker = stack.start_broker("broker-restarted", audit2)
        back_at = time.monotonic()
        deadline = back_at + 5
        while time.monotonic() < deadline:
            if any(t > back_at and s == 200 for t, s, _ in traffic.results):
                break
            time.sleep(0.02)
        time.sleep(2.0)
    results = traffic.results
    during = [(t, s, b) for t, s, b in results if t < back_at]
    # Before the first 503: only successes (the cached token was used); afterwards: 503s that
    # say why, until the broker is back.
    assert all(s == 200 for t, s, _ in during if t < first_503)
    assert first_503 - stopped_at <= TTL + 0.5, "a token was used past its expiry"
    unavailable = [b for t, s, b in during if t >= first_503]
    assert unavailable and all(b.get("error") == "no_valid_token" for b in unavailable)
    sample = unavailable[-1]
    assert sample["audience"] == ORDERS and "unavailable" in sample["detail"], sample
    assert all(s in (200, 503) for _, s, _ in results)
    # Recovery within one backoff delay (backoff_max 1 s) of the broker answering again, and
    # no failure after.
    first_ok = next(t for t, s, _ in results if t > back_at and s == 200)
    assert first_ok - back_at < 1.5, f"resumed {first_ok - back_at:.2f}s after the broker"
    assert all(s == 200 for t, s, _ in results if t > first_ok)
    # No burst: during the outage, with requests arriving back to back, the sidecar asked at
    # the pace of its backoff schedule (demand fetches share it), never per request.
    outage = back_at - stopped_at
    assert outage_fetches <= outage / 0.5 + 6, (outage_fetches, outage)
    # And the returning broker saw one recovery fetch, then ordinary refreshes.
    recovered = issuances(audit2)
    window = time.monotonic() - back_at
    print(
        f"outage: first 503 {first_503 - stopped_at:.2f}s after the broker stopped; "
        f"{len(unavailable)} answers 503; {outage_fetches:.0f} token fetches in {outage:.1f}s; "
        f"resumed {first_ok - back_at:.2f}s after the broker returned; "
        f"{len(recovered)} issuances in the {window:.1f}s since"
    )
    assert 1 <= len(recovered) <= 2 + window / (TTL / 2 - 0.5), (len(recovered), window)
