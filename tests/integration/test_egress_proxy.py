"""The egress proxy in one process with a real token chain — MiniIssuer (RFC 8693 + 9449) →
K8sAttestor → TokenSource → EgressProxy → an upstream that checks every credential with
INDEPENDENT libraries (PyJWT for the access token, jwcrypto for the DPoP proof and the RFC 7638
thumbprint). The "legacy app" is an unmodified blocking client (http.client / urllib) on the
test thread; the servers run on a uvloop in a background thread, over real sockets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any, TypeVar

import jwt as pyjwt
import pytest
import uvloop
from aiohttp import web
from jwcrypto import jwk, jws
from prometheus_client import CollectorRegistry, generate_latest

from sidecar.egress.config import parse_egress_config
from sidecar.egress.proxy import EgressProxy
from sidecar.identity.attestors import K8sAttestor
from sidecar.identity.key import generate_signer
from sidecar.identity.metrics import IdentityMetrics
from sidecar.identity.schedule import RefreshPolicy
from sidecar.identity.source import TokenSource
from sidecar.local_ports import free_port
from tests.integration.test_egress_attestors import FORBIDDEN, ORDERS, PAYMENTS, MiniIssuer

T = TypeVar("T")
FRONTEND = "spiffe://demo.local/ns/shop/sa/frontend"


def b64sha256(text: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()


class Upstream:
    """Checks what the proxy sends, like a strict resource server would (RFC 9449 §7)."""

    def __init__(self, issuer: MiniIssuer) -> None:
        self.issuer = issuer
        self.nonce = "rs-nonce-1"
        self.seen: list[dict[str, Any]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    def verify(self, request: web.Request) -> dict[str, Any]:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        out: dict[str, Any] = {"scheme": scheme}
        claims = pyjwt.decode(
            token,
            self.issuer.key.public_key(),
            algorithms=["ES256"],
            audience=[ORDERS, PAYMENTS],
            issuer=self.issuer.url,
        )
        out["sub"] = claims["sub"]
        proofs = request.headers.getall("DPoP", [])
        assert len(proofs) == 1, proofs
        proof = jws.JWS()
        proof.deserialize(proofs[0])
        header = proof.jose_header
        assert header["typ"] == "dpop+jwt" and header["alg"] == "ES256"
        key = jwk.JWK(**header["jwk"])
        proof.verify(key)
        pc = json.loads(proof.payload)
        url = f"http://{request.host}{request.path}"
        assert pc["htm"] == request.method, (pc["htm"], request.method)
        assert pc["htu"] == f"http://{request.headers['Host']}{request.raw_path.split('?')[0]}"
        assert pc["ath"] == b64sha256(token)
        assert abs(pc["iat"] - time.time()) < 5
        assert key.thumbprint() == claims["cnf"]["jkt"], "token bound to the proof key"
        out.update(htu=pc["htu"], url=url, jti=pc["jti"], nonce=pc.get("nonce"), iat=pc["iat"])
        return out

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/slow"):
            await asyncio.sleep(2)
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        try:
            checked = self.verify(request)
        except Exception as exc:  # any verification failure is a 401
            return web.json_response({"error": repr(exc)}, status=401)
        record = {
            **checked,
            "method": request.method,
            "path": request.raw_path,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body_bytes": size,
        }
        self.seen.append(record)
        if path.startswith("/restarted") and checked["iat"] < time.time() + 2:
            # Our ingress just after its replay store restarted, on a clock 4 s ahead of ours:
            # a proof of our "now" looks as if it predates the store (RFC 9110 Date says when).
            return web.json_response(
                {"error": "proof_predates_restart"},
                status=503,
                headers={
                    "x-authz-reason": "proof_predates_restart",
                    "Retry-After": "6",
                    "Date": formatdate(time.time() + 4, usegmt=True),
                },
            )
        if path.startswith("/nonce") and checked["nonce"] != self.nonce:
            return web.json_response(
                {"error": "use_dpop_nonce"},
                status=401,
                headers={
                    "WWW-Authenticate": 'DPoP error="use_dpop_nonce", algs="ES256"',
                    "DPoP-Nonce": self.nonce,
                },
            )
        if path.startswith("/stream"):
            resp = web.StreamResponse(
                headers={"Content-Type": "text/plain", "X-Hop": "1", "Connection": "X-Hop"}
            )
            await resp.prepare(request)
            for i in range(5):
                await resp.write(f"chunk {i}\n".encode())
            await resp.write_eof()
            return resp
        headers = {"DPoP-Nonce": self.nonce} if path.startswith("/offer") else {}
        return web.json_response(record, headers=headers)

    async def start(self) -> Upstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = next(a[1] for a in self._runner.addresses if isinstance(a, tuple))
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class World:
    """Everything on one uvloop in a background thread; the test thread is the app."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.registry = CollectorRegistry()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.issuer = await MiniIssuer(ttl=300).start()
        self.upstream = await Upstream(self.issuer).start()
        self.dead_port = free_port()  # nothing ever listens here
        token_file = self.tmp / "sa-token"
        token_file.write_text(self.issuer.cluster.sa_token())
        self.signer = generate_signer()
        attestor = K8sAttestor(
            issuer=self.issuer.url, token_file=str(token_file), signer=self.signer, timeout=2
        )
        up = f"http://127.0.0.1:{self.upstream.port}"
        cfg = parse_egress_config(
            {
                "upstreams": [
                    {"name": "orders", "listen": "127.0.0.1:0", "upstream": up, "audience": ORDERS},
                    {
                        "name": "keep",
                        "listen": "127.0.0.1:0",
                        "upstream": up,
                        "audience": ORDERS,
                        "on_existing_authorization": "keep",
                    },
                    {
                        "name": "reject",
                        "listen": "127.0.0.1:0",
                        "upstream": up,
                        "audience": ORDERS,
                        "on_existing_authorization": "reject",
                    },
                    {
                        "name": "forbidden",
                        "listen": "127.0.0.1:0",
                        "upstream": up,
                        "audience": FORBIDDEN,
                    },
                    {
                        "name": "dead",
                        "listen": "127.0.0.1:0",
                        "upstream": f"http://127.0.0.1:{self.dead_port}",
                        "audience": ORDERS,
                    },
                    {
                        "name": "api",
                        "listen": "127.0.0.1:0",
                        "upstream": f"{up}/api/v1",
                        "audience": PAYMENTS,
                    },
                ],
                "forward_proxy": {
                    "listen": "127.0.0.1:0",
                    "destinations": [
                        {"match": "orders.shop", "audience": ORDERS, "upstream": up},
                        {"match": f"127.0.0.1:{self.upstream.port}", "audience": PAYMENTS},
                    ],
                },
                "timeouts": {"read": 0.5},
                "nonce_retry_buffer": 1024,
            }
        )
        self.tokens = TokenSource(
            attestor, RefreshPolicy(), [ORDERS, PAYMENTS], metrics=IdentityMetrics(self.registry)
        )
        await self.tokens.start()
        self.proxy = EgressProxy(
            cfg, tokens=self.tokens, signer=self.signer, registry=self.registry
        )
        await self.proxy.start()
        for _ in range(200):
            if self.tokens.readiness()[0]:
                break
            await asyncio.sleep(0.02)

    async def _stop(self) -> None:
        await self.proxy.stop()
        await self.tokens.close()
        await self.upstream.close()
        await self.issuer.close()

    def __enter__(self) -> World:
        self.thread.start()
        self.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()

    def port(self, name: str) -> int:
        return self.proxy.ports[name]

    def request(
        self,
        name: str,
        method: str,
        path: str,
        *,
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        chunked: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        """An unmodified http.client call to a local listener (the legacy app's view)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port(name), timeout=10)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in headers or []:
                conn.putheader(k, v)
            if chunked:
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                assert body is not None
                for i in range(0, len(body), 1000):
                    part = body[i : i + 1000]
                    conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                conn.send(b"0\r\n\r\n")
            else:
                if body is not None:
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with World(tmp_path_factory.mktemp("egress")) as w:
        yield w


def last_seen(world: World) -> dict[str, Any]:
    return world.upstream.seen[-1]


def test_call_arrives_with_a_bound_token_and_a_proof_for_the_exact_request(world: World) -> None:
    status, headers, body = world.request(
        "orders",
        "GET",
        "/orders/42?expand=items&x=%2F",
        headers=[
            ("Authorization", "Basic YXBwOnB3"),
            ("DPoP", "app-junk"),
            ("Connection", "X-Private"),
            ("X-Private", "1"),
            ("Keep-Alive", "timeout=9"),
            ("Proxy-Authorization", "Basic eDp5"),
            ("X-Request-Id", "r-1"),
        ],
    )
    assert status == 200, body
    seen = json.loads(body)
    assert seen["scheme"] == "DPoP" and seen["sub"] == FRONTEND
    assert seen["path"] == "/orders/42?expand=items&x=%2F", "path and query byte for byte"
    assert seen["htu"] == f"http://127.0.0.1:{world.upstream.port}/orders/42"
    hdrs = seen["headers"]
    assert hdrs["host"] == f"127.0.0.1:{world.upstream.port}"
    assert hdrs["x-request-id"] == "r-1"
    for gone in ("x-private", "keep-alive", "proxy-authorization", "connection"):
        assert gone not in hdrs, gone
    assert hdrs["via"] == "1.1 sidecar"
    for ours in ("user-agent", "accept", "accept-encoding", "content-type"):
        assert ours not in hdrs, f"no {ours} of aiohttp's own"
    assert headers["content-type"].startswith("application/json")


def test_small_and_streamed_bodies_go_without_a_content_type_of_ours(world: World) -> None:
    """A body the app sent without Content-Type arrives without one (aiohttp would add
    application/octet-stream), buffered or streamed; the app's own passes unchanged."""
    for size in (10, 100_000):
        status, _, body = world.request("orders", "POST", "/orders", body=b"x" * size)
        assert status == 200 and json.loads(body)["body_bytes"] == size
        hdrs = last_seen(world)["headers"]
        assert "content-type" not in hdrs and "user-agent" not in hdrs and "accept" not in hdrs
    world.request("orders", "PATCH", "/orders", body=b"{}", headers=[("Content-Type", "a/b")])
    assert last_seen(world)["headers"]["content-type"] == "a/b"


def test_every_request_gets_a_fresh_proof(world: World) -> None:
    for _ in range(3):
        assert world.request("orders", "GET", "/orders/1")[0] == 200
    jtis = [s["jti"] for s in world.upstream.seen[-3:]]
    assert len(set(jtis)) == 3


def test_post_bodies_fixed_length_and_chunked(world: World) -> None:
    payload = bytes(range(256)) * 400  # 100 KiB: above the replay buffer, streamed
    status, _, body = world.request(
        "orders",
        "POST",
        "/orders",
        body=payload,
        headers=[("Content-Type", "application/octet-stream")],
    )
    assert status == 200 and json.loads(body)["body_bytes"] == len(payload)
    assert last_seen(world)["headers"]["content-length"] == str(len(payload))
    status, _, body = world.request("orders", "PUT", "/orders/7", body=payload, chunked=True)
    assert status == 200 and json.loads(body)["body_bytes"] == len(payload)
    assert json.loads(body)["method"] == "PUT"


def test_base_path_of_the_upstream_is_prepended(world: World) -> None:
    status, _, body = world.request("api", "DELETE", "/orders/9?soft=1")
    assert status == 200
    seen = json.loads(body)
    assert seen["path"] == "/api/v1/orders/9?soft=1"
    assert seen["htu"].endswith("/api/v1/orders/9")


def test_existing_authorization_keep_and_reject(world: World) -> None:
    status, _, body = world.request(
        "keep", "GET", "/orders/1", headers=[("Authorization", "Basic YXBwOnB3")]
    )
    assert status == 401, "kept the app's own credentials, injected nothing"
    # Without an Authorization header the keep listener injects as usual.
    assert world.request("keep", "GET", "/orders/1")[0] == 200
    status, headers, body = world.request(
        "reject", "GET", "/orders/1", headers=[("Authorization", "Bearer x")]
    )
    assert status == 403 and json.loads(body)["error"] == "existing_authorization"
    assert headers["x-sidecar-error"] == "existing_authorization"


def test_nonce_challenge_is_answered_with_one_retry(world: World) -> None:
    world.upstream.nonce = "rs-nonce-A"
    before = len(world.upstream.seen)
    status, _, body = world.request("orders", "POST", "/nonce/pay", body=b'{"amount": 5}')
    assert status == 200, body
    attempts = world.upstream.seen[before:]
    assert [a["nonce"] for a in attempts] == [None, "rs-nonce-A"]
    assert attempts[1]["body_bytes"] == len(b'{"amount": 5}'), "the buffered body was replayed"
    # The nonce is now cached for this origin: no challenge the next time.
    before = len(world.upstream.seen)
    assert world.request("orders", "GET", "/nonce/again")[0] == 200
    assert [a["nonce"] for a in world.upstream.seen[before:]] == ["rs-nonce-A"]


def test_nonce_challenge_with_a_streamed_body_goes_back_to_the_app(world: World) -> None:
    world.upstream.nonce = "rs-nonce-B"
    before = len(world.upstream.seen)
    status, headers, _ = world.request("orders", "POST", "/nonce/big", body=b"x" * 5000)
    assert status == 401, "a body over the replay buffer is not replayed"
    assert headers["dpop-nonce"] == "rs-nonce-B"
    assert len(world.upstream.seen) - before == 1
    # But the nonce was learnt: the app's own retry succeeds at once.
    assert world.request("orders", "POST", "/nonce/big", body=b"x" * 5000)[0] == 200
    text = generate_latest(world.registry).decode()
    assert 'sidecar_egress_nonce_retries_total{outcome="not_replayable",upstream="orders"}' in text


def test_a_nonce_offered_on_any_response_is_used_next(world: World) -> None:
    world.upstream.nonce = "rs-nonce-C"
    assert world.request("orders", "GET", "/offer")[0] == 200
    before = len(world.upstream.seen)
    assert world.request("orders", "GET", "/nonce/x")[0] == 200
    assert [a["nonce"] for a in world.upstream.seen[before:]] == ["rs-nonce-C"]


def test_a_restarted_ingress_on_a_clock_ahead_gets_a_proof_on_its_clock(world: World) -> None:
    before = len(world.upstream.seen)
    status, _, body = world.request("orders", "GET", "/restarted")
    assert status == 200, body
    first, again = world.upstream.seen[before:]
    assert again["iat"] - first["iat"] >= 2, "signed again with the ingress's clock"
    # Ordinary answers (Date = our clock) bring the correction back for the next tests.
    assert world.request("orders", "GET", "/after")[0] == 200


def test_no_valid_token_is_a_clear_503(world: World) -> None:
    status, headers, body = world.request("forbidden", "GET", "/orders/1")
    assert status == 503
    doc = json.loads(body)
    assert doc["error"] == "no_valid_token" and doc["audience"] == FORBIDDEN
    assert "access_denied" in doc["detail"]
    assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"


def test_streamed_response_and_head(world: World) -> None:
    status, headers, body = world.request("orders", "GET", "/stream")
    assert status == 200
    assert body == b"".join(f"chunk {i}\n".encode() for i in range(5))
    assert "x-hop" not in headers, "a field the upstream's Connection listed is hop-by-hop"
    status, headers, body = world.request("orders", "HEAD", "/orders/1")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def test_upstream_failures_are_502_and_504(world: World) -> None:
    status, _, body = world.request("dead", "GET", "/x")
    assert status == 502 and json.loads(body)["error"] == "upstream_unreachable"
    status, _, body = world.request("orders", "GET", "/slow")
    assert status == 504 and json.loads(body)["error"] == "upstream_timeout"


def test_forward_proxy_for_http_proxy_apps(world: World) -> None:
    proxy = f"http://127.0.0.1:{world.proxy.forward_port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    with opener.open("http://orders.shop/orders/5?a=b", timeout=5) as resp:
        seen = json.loads(resp.read())
    assert seen["sub"] == FRONTEND and seen["path"] == "/orders/5?a=b"
    assert seen["htu"] == f"http://127.0.0.1:{world.upstream.port}/orders/5"
    # A destination reached at its own address (no upstream override), other audience.
    with opener.open(f"http://127.0.0.1:{world.upstream.port}/p", timeout=5) as resp:
        assert json.loads(resp.read())["scheme"] == "DPoP"
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open("http://evil.example/steal", timeout=5)
    assert info.value.code == 403
    assert json.loads(info.value.read())["error"] == "destination_not_allowed"


def test_forward_proxy_refuses_connect_and_origin_form(world: World) -> None:
    port = world.proxy.forward_port
    assert port is not None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.set_tunnel("orders.shop", 443)
    with pytest.raises(OSError, match="405"):
        conn.request("GET", "/")
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    with contextlib.closing(conn):
        conn.request("GET", "/orders/1")
        resp = conn.getresponse()
        assert resp.status == 400
        assert json.loads(resp.read())["error"] == "absolute_form_required"


def test_metrics(world: World) -> None:
    world.request("orders", "GET", "/orders/1")
    world.request("forbidden", "GET", "/orders/1")
    text = generate_latest(world.registry).decode()
    assert 'sidecar_egress_requests_total{status_class="2xx",upstream="orders"}' in text
    assert 'sidecar_egress_requests_total{status_class="5xx",upstream="forbidden"}' in text
    assert 'sidecar_egress_local_responses_total{reason="no_valid_token",upstream="forbidden"}' in (
        text
    )
    assert 'sidecar_egress_added_latency_seconds_count{upstream="orders"}' in text
    assert f'sidecar_identity_token_expiry_seconds{{audience="{ORDERS}"}}' in text
