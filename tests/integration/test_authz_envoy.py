"""The ext_authz server behind the real Envoy, over gRPC and over HTTP: every request goes
client → Envoy → (Check) → sidecar authz → Envoy → echo app, all real processes."""

from __future__ import annotations

import http.client
import json
import re
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import yaml

from sidecar.envoy_config import ingress_bootstrap
from tests.integration.harness import (
    ManagedProcess,
    free_port,
    http_request,
    start_echo_app,
    start_envoy,
    wait_for_http,
)
from tests.integration.issuer import AUDIENCE, FRONTEND, INTRUDER, DevIssuer, client_signer
from tests.integration.live_metrics import check_live_metrics, sample


@dataclass
class Stack:
    mode: str
    envoy_port: int
    admin_port: int
    issuer: DevIssuer
    authz: ManagedProcess
    authz_admin: int
    envoy: ManagedProcess
    log_format: str

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.envoy_port}{path}"

    def request(
        self, method: str, path: str, headers: list[tuple[str, str]] | None = None
    ) -> tuple[int, dict[str, str], dict[str, Any] | str]:
        """http.client so that headers can be repeated and sent exactly as given."""
        conn = http.client.HTTPConnection("127.0.0.1", self.envoy_port, timeout=10)
        try:
            conn.putrequest(method, path)
            for name, value in headers or []:
                conn.putheader(name, value)
            conn.endheaders()
            resp = conn.getresponse()
            raw = resp.read()
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        try:
            body: dict[str, Any] | str = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        return resp.status, hdrs, body


def _authz_config(tmp: Path, issuer: DevIssuer, grpc_port: int, http_port: int) -> Path:
    cfg = {
        "authz": {
            "audience": AUDIENCE,
            "issuers": [
                {
                    "issuer": issuer.issuer,
                    "jwks_file": str(issuer.write_jwks(tmp / "jwks.json")),
                    "algorithms": ["ES256"],
                }
            ],
            "grpc": {"listen": f"127.0.0.1:{grpc_port}"},
            "http": {"listen": f"127.0.0.1:{http_port}"},
            "nonce": {"secret": "integration-test-nonce-secret"},
            "routes": [
                {"prefix": "/nonce", "auth": "dpop", "nonce": True},
                {"prefix": "/bearer", "auth": "bearer"},
                {"prefix": "/orders", "auth": "dpop"},  # names the M9 metric's route label
            ],
            "rules": [
                {
                    "name": "frontend",
                    "principals": ["spiffe://demo.local/ns/shop/**"],
                    "methods": ["GET", "POST"],
                    "paths": ["/orders", "/nonce", "/bearer"],
                }
            ],
        },
        "admin": {"listen": "127.0.0.1:0"},
    }
    path = tmp / "authz.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# gRPC with each engine (loop, the default; threads; aio), and HTTP.
@pytest.fixture(scope="module", params=["grpc", "grpc-threads", "grpc-aio", "http"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    mode, _, engine = request.param.partition("-")
    tmp = tmp_path_factory.mktemp(f"authz-{request.param}")
    issuer = DevIssuer()
    grpc_port, http_port, admin_port = free_port(), free_port(), free_port()
    app_port, envoy_port, envoy_admin = free_port(), free_port(), free_port()
    cfg = _authz_config(tmp, issuer, grpc_port, http_port)
    app = start_echo_app(app_port, tmp, name=f"orders-{mode}")
    # Both log formats, each on both transports' stacks: the decision log test reads either.
    log_format = "json" if request.param in ("grpc", "grpc-aio") else "text"
    authz = ManagedProcess(
        [sys.executable, "-m", "sidecar", "--log-format", log_format, "authz", "-c", str(cfg)],
        name=f"authz-{mode}",
        log_dir=tmp,
        env={
            "SIDECAR__ADMIN__LISTEN": f"127.0.0.1:{admin_port}",
            "SIDECAR__AUTHZ__GRPC__ENGINE": engine or "loop",
        },
    ).start()
    envoy = None
    try:
        wait_for_http(f"http://127.0.0.1:{admin_port}/readyz", 20, process=authz)
        ready, shown = authz.log_path.read_text(), engine or "loop"
        assert f"engine={shown}" in ready or f'"engine":"{shown}"' in ready
        envoy = start_envoy(
            ingress_bootstrap(
                listen_port=envoy_port,
                upstream_port=app_port,
                admin_port=envoy_admin,
                mode=mode,
                authz_port=grpc_port if mode == "grpc" else http_port,
            ),
            tmp,
            envoy_admin,
        )
        yield Stack(mode, envoy_port, envoy_admin, issuer, authz, admin_port, envoy, log_format)
    finally:
        for proc in (envoy, authz, app):
            if proc is not None:
                proc.stop()


def dpop_headers(
    stack: Stack,
    path: str,
    *,
    method: str = "GET",
    token: str | None = None,
    proof_method: str | None = None,
    proof_url: str | None = None,
    nonce: str | None = None,
    sub: str = FRONTEND,
) -> list[tuple[str, str]]:
    signer = client_signer()
    token = token or stack.issuer.token(sub=sub, jkt=signer.thumbprint)
    proof = signer.proof(
        method=proof_method or method,
        url=proof_url or stack.url(path),
        now=time.time(),
        access_token=token,
        nonce=nonce,
    )
    return [("Authorization", f"DPoP {token}"), ("DPoP", proof)]


def assert_denied(
    result: tuple[int, dict[str, str], Any], status: int, reason: str, error: str | None
) -> None:
    code, headers, body = result
    assert code == status, (code, headers, body)
    assert headers.get("x-authz-reason") == reason, headers
    assert isinstance(body, dict) and body["reason"] == reason, body
    if error is not None:
        assert f'error="{error}"' in headers["www-authenticate"], headers
    assert "app" not in body, "a denied request reached the app"


def test_valid_dpop_request_reaches_app_with_identity(stack: Stack) -> None:
    headers = dpop_headers(stack, "/orders/42?expand=1")
    headers += [("X-Workload-Id", "spiffe://spoofed"), ("X-Workload-Role", "admin")]
    status, _, body = stack.request("GET", "/orders/42?expand=1", headers)
    assert status == 200, body
    assert isinstance(body, dict)
    seen = body["headers"]
    assert seen["x-workload-id"] == FRONTEND
    assert seen["x-workload-auth"] == "dpop"
    assert "authorization" not in seen and "dpop" not in seen
    assert "x-workload-role" not in seen, "a spoofed identity header reached the app"
    assert body["path"] == "/orders/42?expand=1"


def test_method_override_headers_never_reach_the_app(stack: Stack) -> None:
    # Allowed as GET; an app framework honouring an override header would run DELETE.
    overrides = [("X-HTTP-Method-Override", "DELETE"), ("X-HTTP-Method", "DELETE")]
    overrides.append(("X-Method-Override", "DELETE"))
    status, _, body = stack.request(
        "GET", "/orders/7", dpop_headers(stack, "/orders/7") + overrides
    )
    assert status == 200, body
    assert isinstance(body, dict) and body["method"] == "GET"
    seen = body["headers"]
    assert not {"x-http-method-override", "x-http-method", "x-method-override"} & set(seen), seen


def test_replayed_request_is_denied(stack: Stack) -> None:
    headers = dpop_headers(stack, "/orders/1")
    assert stack.request("GET", "/orders/1", headers)[0] == 200
    assert_denied(stack.request("GET", "/orders/1", headers), 401, "replayed", "invalid_dpop_proof")
    # The admin port counts it, by transport and reason, next to the replay-hit counter.
    status, _, body = http_request(f"http://127.0.0.1:{stack.authz_admin}/metrics")
    metrics = body.decode()
    assert status == 200
    line = (
        f'sidecar_authz_decisions_total{{reason="replayed",result="deny",transport="{stack.mode}"}}'
    )
    assert line in metrics, metrics[:2000]
    hits = re.search(r"^sidecar_authz_replay_hits_total (\S+)$", metrics, re.M)
    assert hits is not None and float(hits.group(1)) >= 1
    assert f'sidecar_authz_check_seconds_count{{transport="{stack.mode}"}}' in metrics


@pytest.mark.parametrize(
    ("case", "reason", "error"),
    [
        ("wrong_audience", "wrong_audience", "invalid_token"),
        ("expired", "expired", "invalid_token"),
        ("bad_signature", "bad_signature", "invalid_token"),
        ("alg_none", "alg_not_allowed", "invalid_token"),
        ("hs256_public_key", "alg_not_allowed", "invalid_token"),
        ("other_method", "htm_mismatch", "invalid_dpop_proof"),
        ("other_url", "htu_mismatch", "invalid_dpop_proof"),
        ("no_proof", "proof_missing", "invalid_dpop_proof"),
        ("missing", "missing_credentials", None),
    ],
)
def test_bad_credentials_are_denied(
    stack: Stack, case: str, reason: str, error: str | None
) -> None:
    signer = client_signer()
    iss = stack.issuer
    path = "/orders/7"
    token = iss.token(jkt=signer.thumbprint)
    proof_kw: dict[str, Any] = {"method": "GET", "url": stack.url(path)}
    if case == "wrong_audience":
        token = iss.token(jkt=signer.thumbprint, aud="spiffe://demo.local/ns/shop/sa/payments")
    elif case == "expired":
        token = iss.token(jkt=signer.thumbprint, now=time.time() - 600, ttl=60)
    elif case == "bad_signature":
        head, body, sig = token.split(".")
        token = f"{head}.{body}.{sig[:-4]}{'AAAA' if not sig.endswith('AAAA') else 'BBBB'}"
    elif case == "alg_none":
        token = iss.alg_none(jkt=signer.thumbprint)
    elif case == "hs256_public_key":
        token = iss.hs256_with_public_key(jkt=signer.thumbprint)
    elif case == "other_method":
        proof_kw["method"] = "POST"
    elif case == "other_url":
        proof_kw["url"] = stack.url("/admin")
    headers = [("Authorization", f"DPoP {token}")]
    if case not in ("no_proof", "missing"):
        headers.append(("DPoP", signer.proof(now=time.time(), access_token=token, **proof_kw)))
    if case == "missing":
        headers = []
    result = stack.request("GET", path, headers)
    assert_denied(result, 401, reason, error)
    if case == "missing":
        assert result[1]["www-authenticate"].startswith("DPoP algs=")


def test_nonce_challenge_then_success(stack: Stack) -> None:
    path = "/nonce/x"
    status, headers, body = stack.request("GET", path, dpop_headers(stack, path))
    assert_denied((status, headers, body), 401, "nonce_required", "use_dpop_nonce")
    nonce = headers["dpop-nonce"]
    assert len(nonce) == 32
    status, headers, body = stack.request("GET", path, dpop_headers(stack, path, nonce=nonce))
    assert status == 200, body
    assert headers.get("dpop-nonce"), "a fresh nonce is offered on success"


def test_stale_or_forged_nonce_is_denied_with_fresh_challenge(stack: Stack) -> None:
    path = "/nonce/y"
    result = stack.request("GET", path, dpop_headers(stack, path, nonce="A" * 32))
    assert_denied(result, 401, "nonce_invalid", "use_dpop_nonce")
    assert result[1]["dpop-nonce"] != "A" * 32


def test_policy_forbidden_caller_gets_403(stack: Stack) -> None:
    def denies() -> float | None:
        page = http_request(f"http://127.0.0.1:{stack.authz_admin}/metrics")[2].decode()
        return sample(page, "sidecar_authz_policy_denies_total", route="/orders")

    before = denies()
    result = stack.request("GET", "/orders/1", dpop_headers(stack, "/orders/1", sub=INTRUDER))
    assert_denied(result, 403, "policy_denied", None)
    # M9: counted under the configured route the path fell under.
    assert denies() == (before or 0) + 1


def test_live_metrics_pass_promtool(stack: Stack) -> None:
    page = check_live_metrics(f"http://127.0.0.1:{stack.authz_admin}/metrics")
    # The keys came from a file at start; the alerts' zero-tolerance children exist at 0.
    refreshes = sample(page, "sidecar_jwks_refreshes_total", trigger="startup", outcome="changed")
    assert refreshes == 1
    labels = {"transport": stack.mode, "result": "deny", "reason": "proof_key_mismatch"}
    assert sample(page, "sidecar_authz_decisions_total", **labels) is not None


def test_bearer_route_and_bound_token_as_bearer(stack: Stack) -> None:
    unbound = stack.issuer.token()
    status, _, body = stack.request("GET", "/bearer/a", [("Authorization", f"Bearer {unbound}")])
    assert status == 200, body
    assert isinstance(body, dict) and body["headers"]["x-workload-auth"] == "bearer"
    bound = stack.issuer.token(jkt=client_signer().thumbprint)
    result = stack.request("GET", "/bearer/a", [("Authorization", f"Bearer {bound}")])
    assert_denied(result, 401, "bearer_not_allowed", None)
    result = stack.request("GET", "/orders/1", [("Authorization", f"Bearer {unbound}")])
    assert_denied(result, 401, "bearer_not_allowed", None)


def test_duplicated_dpop_header_is_denied(stack: Stack) -> None:
    headers = dpop_headers(stack, "/orders/2")
    headers.append(headers[1])
    assert_denied(stack.request("GET", "/orders/2", headers), 401, "proof_invalid", None)


@pytest.mark.parametrize(
    "authorization",
    [
        "DPoP eyJhbGciOiJFUzI1NiJ9",  # truncated: one segment
        "DPoP eyJhbGciOiJFUzI1NiJ9.bm90IGpzb24.c2ln",  # payload is not JSON
        "DPoP bm90IGpzb24.e30.c2ln",  # header is not JSON
        "DPoP " + "A" * 20000,  # huge
        "DPoP a.b.c.d.e",
        "Basic dXNlcjpwYXNz",
    ],
    ids=["truncated", "payload-not-json", "header-not-json", "huge", "five-parts", "basic"],
)
def test_garbage_is_denied_and_server_survives(stack: Stack, authorization: str) -> None:
    status, headers, _ = stack.request("GET", "/orders/3", [("Authorization", authorization)])
    assert status == 401
    assert headers["x-authz-reason"] in {"malformed_token", "missing_credentials"}
    # Still answering correctly afterwards.
    assert stack.request("GET", "/orders/3", dpop_headers(stack, "/orders/3"))[0] == 200
    assert stack.authz.is_running()


def test_wrong_claim_types_are_malformed(stack: Stack) -> None:
    signer = client_signer()
    token = stack.issuer.token(jkt=signer.thumbprint, exp="tomorrow")
    proof = signer.proof(
        method="GET", url=stack.url("/orders/4"), now=time.time(), access_token=token
    )
    result = stack.request(
        "GET", "/orders/4", [("Authorization", f"DPoP {token}"), ("DPoP", proof)]
    )
    assert_denied(result, 401, "malformed_token", "invalid_token")


def h2c_request(
    port: int, method: str, path: str, headers: list[tuple[str, str]], *, scheme: str
) -> tuple[int, dict[str, str], dict[str, Any] | str]:
    """One cleartext HTTP/2 request (prior knowledge) with the ``:scheme`` the caller picks:
    HTTP/2 lets a client claim ``https`` on a connection that has no TLS."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    status, hdrs, body = 0, {}, b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        request = [
            (":method", method),
            (":scheme", scheme),
            (":authority", f"127.0.0.1:{port}"),
            (":path", path),
        ]
        conn.send_headers(stream, request + [(k.lower(), v) for k, v in headers], end_stream=True)
        sock.sendall(conn.data_to_send())
        done = False
        while not done:
            data = sock.recv(65536)
            assert data, "Envoy closed the HTTP/2 connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    hdrs = {k.decode(): v.decode() for k, v in event.headers}
                    status = int(hdrs.pop(":status"))
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    done = True
            sock.sendall(conn.data_to_send())
    try:
        return status, hdrs, json.loads(body)
    except ValueError:
        return status, hdrs, body.decode(errors="replace")


def test_client_claimed_https_scheme_over_cleartext_is_denied(stack: Stack) -> None:
    """Issue 14 item 1: the scheme is what Envoy says about the connection, on both transports.
    A proof made for https:// does not match a cleartext request that claims ``:scheme: https``.
    """
    path = "/orders/11"
    https_url = f"https://127.0.0.1:{stack.envoy_port}{path}"
    claimed = h2c_request(
        stack.envoy_port,
        "GET",
        path,
        dpop_headers(stack, path, proof_url=https_url),
        scheme="https",
    )
    assert_denied(claimed, 401, "htu_mismatch", "invalid_dpop_proof")
    # The same h2c client with the truthful scheme and a proof for it gets through.
    status, _, body = h2c_request(
        stack.envoy_port, "GET", path, dpop_headers(stack, path), scheme="http"
    )
    assert status == 200, body
    assert isinstance(body, dict) and body["headers"]["x-workload-id"] == FRONTEND


@pytest.mark.parametrize("sent", ["/orders//12", "//orders/12", "/orders/./12", "/orders/x/../12"])
def test_proof_for_the_path_as_sent_matches_what_envoy_forwards(stack: Stack, sent: str) -> None:
    """Issue 14 item 10: Envoy merges slashes and removes dot segments before the check and
    before the app; a proof made for the path the client sent matches that forwarded path."""
    status, _, body = stack.request("GET", sent, dpop_headers(stack, sent))
    assert status == 200, body
    assert isinstance(body, dict) and body["path"] == "/orders/12"
    # A proof for another path still does not.
    result = stack.request(
        "GET", sent, dpop_headers(stack, sent, proof_url=stack.url("/orders/13"))
    )
    assert_denied(result, 401, "htu_mismatch", "invalid_dpop_proof")


def _decision_lines(stack: Stack, needle: str) -> list[dict[str, str]]:
    """The authorizer's decision lines mentioning ``needle``, as field dicts (either format)."""
    out = []
    for line in stack.authz.log_text().splitlines():
        if needle not in line:
            continue
        if stack.log_format == "json":
            record = json.loads(line)
            if record.get("msg") == "decision":
                out.append({k: str(v) for k, v in record.items()})
            continue
        head = re.match(r"\S+ (\w+) (\S+) decision ", line)
        if head:
            fields = dict(re.findall(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|\S+)', line[head.end() :]))
            out.append({"logger": head.group(2), **{k: v.strip('"') for k, v in fields.items()}})
    return out


def test_a_deny_is_one_decision_line_with_envoys_request_id(stack: Stack) -> None:
    """Issue 11.7: the decision line names the request, and its ``request_id`` is the
    ``x-request-id`` Envoy put in its own access log for that request."""
    path = f"/orders/{uuid.uuid4().hex}"
    result = stack.request("GET", f"{path}?api_key=s3cret", [("Authorization", "DPoP abc")])
    assert_denied(result, 401, "malformed_token", "invalid_token")
    envoy_lines: list[str] = []
    lines: list[dict[str, str]] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (envoy_lines and lines):
        envoy_lines = [x for x in stack.envoy.log_text().splitlines() if path in x]
        lines = _decision_lines(stack, path)
        time.sleep(0.05)
    assert len(envoy_lines) == 1, envoy_lines
    match = re.search(r'req_id="([^"]+)"', envoy_lines[0])
    assert match, envoy_lines
    assert len(lines) == 1, lines
    (line,) = lines
    assert line["request_id"] == match.group(1)
    expected = {
        "logger": f"sidecar.authz.{stack.mode}",
        "result": "deny",
        "reason": "malformed_token",
        "status": "401",
        "transport": stack.mode,
        "method": "GET",
        "host": f"127.0.0.1:{stack.envoy_port}",
        "path": path,
    }
    assert {k: line.get(k) for k in expected} == expected
    assert "s3cret" not in stack.authz.log_text(), "the query string reached the log"
