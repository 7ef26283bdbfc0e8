"""Real Envoy in front of the real echo app, without our authorizer:

* ``none`` mode proxies straight through;
* ``grpc``/``http`` modes with nothing listening on the authorizer port fail closed with 503
  (``status_on_error``) and never reach the app;
* ``grpc``/``http`` modes against tiny in-test stub authorizers: the header plumbing the real
  authorizer relies on (what Envoy sends it, what reaches the app, what the client sees).
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from sidecar.envoy_config import HCM_STAT_PREFIX, ingress_bootstrap
from tests.integration.harness import (
    EchoApp,
    EnvoyFactory,
    ManagedProcess,
    envoy_stats,
    free_port,
    http_request,
)

SPIFFE_ID = "spiffe://demo.local/ns/shop/sa/frontend"


@dataclass
class Ingress:
    envoy: ManagedProcess
    port: int
    admin_port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stats(self) -> dict[str, int]:
        return envoy_stats(self.admin_port)


def _ingress(
    envoy_factory: EnvoyFactory, echo_app: EchoApp, mode: str, authz_port: int | None = None
) -> Ingress:
    port, admin = free_port(), free_port()
    cfg = ingress_bootstrap(
        listen_port=port,
        upstream_port=echo_app.port,
        admin_port=admin,
        mode=mode,  # type: ignore[arg-type]
        authz_port=authz_port,
        authz_timeout_ms=1000,
    )
    return Ingress(envoy_factory(cfg, admin), port, admin)


def _json(body: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(body)
    return data


# -- no auth filter --------------------------------------------------------------------------


def test_noauth_proxies_to_the_app(envoy_factory: EnvoyFactory, echo_app: EchoApp) -> None:
    ingress = _ingress(envoy_factory, echo_app, "none")
    body = b"x" * 100_000
    status, headers, raw = http_request(
        ingress.url("/orders/42?expand=items&sig=a%2Fb"),
        method="POST",
        headers={"X-Test": "1", "X_Workload_Id": "smuggled", "Content-Type": "text/plain"},
        body=body,
    )
    assert status == 200, raw
    seen = _json(raw)
    assert seen["app"] == "app"
    assert seen["method"] == "POST"
    assert seen["path"] == "/orders/42?expand=items&sig=a%2Fb"
    assert seen["body_bytes"] == len(body)
    assert seen["headers"]["x-test"] == "1"
    assert seen["headers"]["x-forwarded-proto"] == "http"
    assert seen["headers"]["x-request-id"]
    # Underscored names are dropped at the edge: no identity smuggling via "x_workload_id".
    assert not any("workload" in name for name in seen["headers"]), seen["headers"]
    assert headers["server"] == "envoy"
    assert echo_app.requests_seen(), echo_app.process.log_text()

    request_id = seen["headers"]["x-request-id"]
    ingress.envoy.stop()  # flushes the stdout access log
    lines = [ln for ln in ingress.envoy.log_text().splitlines() if request_id in ln]
    assert len(lines) == 1, ingress.envoy.log_text()
    assert '"POST /orders/42?expand=items&sig=a%2Fb HTTP/1.1" 200 ' in lines[0]
    assert lines[0].endswith("authz=-")  # no ext_authz dynamic metadata in this mode


# -- unreachable authorizer: fail closed -----------------------------------------------------


@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_unreachable_authorizer_fails_closed_with_503(
    mode: str, envoy_factory: EnvoyFactory, echo_app: EchoApp
) -> None:
    dead_port = free_port()  # nothing listens here
    ingress = _ingress(envoy_factory, echo_app, mode, authz_port=dead_port)
    for method in ("GET", "POST"):
        status, _, raw = http_request(
            ingress.url("/orders/1"),
            method=method,
            headers={"Authorization": "DPoP abc", "DPoP": "proof"},
            body=b"payload" if method == "POST" else None,
        )
        assert status == 503, raw
    stats = ingress.stats()
    assert stats[f"http.{HCM_STAT_PREFIX}.ext_authz.error"] == 2, stats
    assert stats.get(f"http.{HCM_STAT_PREFIX}.ext_authz.ok", 0) == 0
    assert stats["cluster.app.upstream_rq_total"] == 0
    assert echo_app.requests_seen() == [], echo_app.process.log_text()


# -- stub authorizers: the header contract ---------------------------------------------------


@dataclass
class Seen:
    """What a stub authorizer received: one dict of lower-cased headers (+ path) per check."""

    checks: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, headers: dict[str, str]) -> None:
        with self.lock:
            self.checks.append(headers)


class _GrpcStub(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    def Check(self, request: Any, context: Any) -> Any:
        http_req = request.attributes.request.http
        self.seen.add({**dict(http_req.headers), ":path": http_req.path})
        if http_req.path.startswith("/deny"):
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.UNAUTHENTICATED),
                denied_response=external_auth_pb2.DeniedHttpResponse(
                    status=http_status_pb2.HttpStatus(code=http_status_pb2.Unauthorized),
                    headers=[
                        _hv("www-authenticate", 'DPoP error="use_dpop_nonce"'),
                        _hv("dpop-nonce", "n-deny"),
                        _hv("x-authz-reason", "nonce_required"),
                    ],
                    body='{"error":"use_dpop_nonce"}',
                ),
                dynamic_metadata=_struct({"reason": "nonce_required"}),
            )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[_hv("x-workload-id", SPIFFE_ID)],
                headers_to_remove=["authorization", "dpop"],
                response_headers_to_add=[_hv("dpop-nonce", "n-ok")],
            ),
            dynamic_metadata=_struct({"identity": SPIFFE_ID}),
        )


def _hv(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _struct(values: dict[str, str]) -> Any:
    s = struct_pb2.Struct()
    s.update(values)
    return s


@pytest.fixture
def grpc_stub() -> Iterator[tuple[int, Seen]]:
    seen = Seen()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(_GrpcStub(seen), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, seen
    finally:
        server.stop(grace=None).wait()


class _HttpStubHandler(http.server.BaseHTTPRequestHandler):
    seen: Seen  # set on the per-fixture subclass

    def _answer(self) -> None:
        self.seen.add({**{k.lower(): v for k, v in self.headers.items()}, ":path": self.path})
        if self.path.startswith("/deny"):
            body = b'{"error":"use_dpop_nonce"}'
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'DPoP error="use_dpop_nonce"')
            self.send_header("DPoP-Nonce", "n-deny")
            self.send_header("X-Authz-Reason", "nonce_required")
            self.send_header("X-Internal-Debug", "must-not-leak")
            self.send_header("Content-Type", "application/json")
        else:
            body = b""
            self.send_response(200)
            self.send_header("X-Workload-Id", SPIFFE_ID)
            self.send_header("X-Envoy-Auth-Headers-To-Remove", "authorization, dpop")
            self.send_header("DPoP-Nonce", "n-ok")
            self.send_header("X-Not-Allowed-Upstream", "nope")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_stub() -> Iterator[tuple[int, Seen]]:
    seen = Seen()
    handler = type("Handler", (_HttpStubHandler,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(params=["grpc", "http"])
def stub_ingress(
    request: pytest.FixtureRequest, envoy_factory: EnvoyFactory, echo_app: EchoApp
) -> tuple[Ingress, Seen]:
    stub_port, seen = request.getfixturevalue(f"{request.param}_stub")
    return _ingress(envoy_factory, echo_app, request.param, authz_port=stub_port), seen


CLIENT_HEADERS = {
    "Authorization": "DPoP the-token",
    "DPoP": "the-proof",
    "X-Workload-Id": "spiffe://evil/spoofed",
    "X-Unrelated": "u",
}


def test_stub_allow_sets_identity_and_strips_credentials(
    stub_ingress: tuple[Ingress, Seen], echo_app: EchoApp
) -> None:
    ingress, seen = stub_ingress
    status, headers, raw = http_request(ingress.url("/orders/7?q=1"), headers=CLIENT_HEADERS)
    assert status == 200, raw

    # The authorizer saw what it needs to verify the DPoP proof and spot spoofed identity.
    (check,) = seen.checks
    assert check[":path"] == "/orders/7?q=1"
    assert check["authorization"] == "DPoP the-token"
    assert check["dpop"] == "the-proof"
    assert check["x-workload-id"] == "spiffe://evil/spoofed"
    assert check["x-forwarded-proto"] == "http"
    assert check.get("host", check.get(":authority")) == f"127.0.0.1:{ingress.port}"

    # The app got the authorizer's identity (spoofed one overwritten), no credentials.
    app_headers = _json(raw)["headers"]
    assert app_headers["x-workload-id"] == SPIFFE_ID
    assert "authorization" not in app_headers
    assert "dpop" not in app_headers
    assert "x-not-allowed-upstream" not in app_headers
    assert app_headers["x-unrelated"] == "u"

    # The client got a fresh nonce on success.
    assert headers["dpop-nonce"] == "n-ok"

    stats = ingress.stats()
    assert stats[f"http.{HCM_STAT_PREFIX}.ext_authz.ok"] == 1, stats


def test_stub_deny_reaches_the_client_not_the_app(
    stub_ingress: tuple[Ingress, Seen], echo_app: EchoApp
) -> None:
    ingress, seen = stub_ingress
    status, headers, raw = http_request(ingress.url("/deny/1"), headers=CLIENT_HEADERS)
    assert status == 401, raw
    assert headers["www-authenticate"] == 'DPoP error="use_dpop_nonce"'
    assert headers["dpop-nonce"] == "n-deny"
    assert headers["x-authz-reason"] == "nonce_required"
    assert "x-internal-debug" not in headers  # HTTP mode: allowed_client_headers filters
    assert _json(raw) == {"error": "use_dpop_nonce"}
    assert len(seen.checks) == 1
    stats = ingress.stats()
    assert stats[f"http.{HCM_STAT_PREFIX}.ext_authz.denied"] == 1, stats
    assert stats["cluster.app.upstream_rq_total"] == 0
    assert echo_app.requests_seen() == []
