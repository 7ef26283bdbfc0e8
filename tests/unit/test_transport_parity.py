"""The README's "the gRPC and HTTP adapters can never disagree", as a property.

Hypothesis makes up client requests (methods, paths with ``//``, ``%2F`` and dot segments,
duplicated headers, claimed schemes, hosts, good and broken tokens and proofs) and turns each
into what Envoy sends for it on both transports: a real ``CheckRequest`` protobuf for the
default gRPC engine's handler (every header, duplicates comma-merged, the client's ``:scheme``
in ``http.scheme``)
and a real aiohttp request for the HTTP app (only the headers the generated config forwards,
under its path prefix). Each transport has its own authorizer built from the same settings, fed
the same sequence; their rendered answers must say the same: allowed, status, reason, headers
set and removed, body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from envoy.service.auth.v3 import external_auth_pb2
from factory import NOW, Harness, make_harness
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from sidecar.authz.grpc_server import LoopCheckHandler
from sidecar.authz.guard import CheckGuard
from sidecar.authz.http_server import HEADERS_TO_REMOVE, make_http_app
from sidecar.envoy_config import HTTP_AUTHZ_ALLOWED_HEADERS

DEFAULT_SCHEME = "http"
PATH_PREFIX = "/authz"
HOSTS = ("orders.demo.local", "ORDERS.demo.local:443", "evil.example", "127.0.0.1:10000")
SEGMENTS = (
    "orders",
    "public",
    "pay",
    "catalog",
    "admin",
    "",
    ".",
    "..",
    "%2F",
    "%2e%2e",
    "%7E",
    "%zz",
    "x;y",
    "a@b",
    "%00",
    "7",
)
METHODS = ("GET", "POST", "DELETE", "get")


def forwarded_to_http(name: str) -> bool:
    """Whether Envoy's HTTP ext_authz forwards a client header (its ``allowed_headers``)."""
    return any(
        name == value if kind == "exact" else name.startswith(value)
        for kind, value in HTTP_AUTHZ_ALLOWED_HEADERS
    )


@dataclass(frozen=True)
class ClientRequest:
    method: str
    path: str
    host: str
    claimed_scheme: str  # the client's :scheme (HTTP/2 lets it say anything)
    forwarded_proto: str | None  # what Envoy asserts about the connection, if it says
    headers: tuple[tuple[str, str], ...]  # lower-case names, in order, duplicates kept

    def check_request(self) -> Any:
        req = external_auth_pb2.CheckRequest()
        http = req.attributes.request.http
        http.method, http.path, http.host, http.scheme = (
            self.method,
            self.path,
            self.host,
            self.claimed_scheme,
        )
        merged: dict[str, str] = {
            ":authority": self.host,
            ":method": self.method,
            ":path": self.path,
            ":scheme": self.claimed_scheme,
        }
        for name, value in self.envoy_headers():
            merged[name] = f"{merged[name]},{value}" if name in merged else value
        http.headers.update(merged)
        req.attributes.source.address.socket_address.address = "10.0.0.7"
        return req

    def http_request(self) -> web.Request:
        headers = CIMultiDict([("Host", self.host)])
        for name, value in self.envoy_headers():
            if forwarded_to_http(name):
                headers.add(name, value)
        return make_mocked_request(self.method, PATH_PREFIX + self.path, headers=headers)

    def envoy_headers(self) -> list[tuple[str, str]]:
        out = [h for h in self.headers if h[0] != "x-forwarded-proto"]
        if self.forwarded_proto is not None:
            out.append(("x-forwarded-proto", self.forwarded_proto))
        return out


def _grpc_answer(response: Any) -> dict[str, Any]:
    if response.HasField("ok_response"):
        ok = response.ok_response
        return {
            "allowed": True,
            "status": 200,
            "set": sorted((o.header.key, o.header.value) for o in ok.headers),
            "remove": sorted(ok.headers_to_remove),
            "response": sorted((o.header.key, o.header.value) for o in ok.response_headers_to_add),
        }
    denied = response.denied_response
    headers = sorted(
        (o.header.key, o.header.value) for o in denied.headers if o.header.key != "content-type"
    )
    return {
        "allowed": False,
        "status": denied.status.code,
        "reason": dict(headers).get("x-authz-reason"),
        "headers": headers,
        "body": json.loads(denied.body),
    }


def _http_answer(response: web.Response) -> dict[str, Any]:
    headers = {k.lower(): v for k, v in response.headers.items()}
    if response.status == 200:
        removed = headers.get(HEADERS_TO_REMOVE, "")
        return {
            "allowed": True,
            "status": 200,
            "set": sorted((k, v) for k, v in headers.items() if k.startswith("x-workload-")),
            "remove": sorted(removed.split(",") if removed else []),
            "response": sorted((k, v) for k, v in headers.items() if k == "dpop-nonce"),
        }
    assert response.text is not None
    skip = ("content-type", "content-length")
    shown = sorted((k, v) for k, v in headers.items() if k not in skip)
    return {
        "allowed": False,
        "status": response.status,
        "reason": headers.get("x-authz-reason"),
        "headers": shown,
        "body": json.loads(response.text),
    }


class Transports:
    """Both adapters, each in front of its own authorizer built from the same settings."""

    def __init__(self, **overrides: Any) -> None:
        self.grpc_side = make_harness(**overrides)
        self.http_side = make_harness(**overrides)
        for h in (self.grpc_side, self.http_side):
            h.authz.clock = lambda: NOW
        # The default gRPC engine's handler: serialized CheckRequest in, serialized answer out.
        self.check = LoopCheckHandler(
            CheckGuard(self.grpc_side.authz, None, "grpc"), DEFAULT_SCHEME
        )
        self.app = make_http_app(
            CheckGuard(self.http_side.authz, None, "http"),
            path_prefix=PATH_PREFIX,
            default_scheme=DEFAULT_SCHEME,
        )

    async def answers(self, request: ClientRequest) -> tuple[dict[str, Any], dict[str, Any]]:
        raw = self.check(request.check_request().SerializeToString())
        if not isinstance(raw, bytes):
            raw = await raw
        grpc = external_auth_pb2.CheckResponse.FromString(raw)
        http_request = request.http_request()
        match = await self.app.router.resolve(http_request)
        response = await match.handler(http_request)
        assert isinstance(response, web.Response)
        return _grpc_answer(grpc), _http_answer(response)


# -- the requests ---------------------------------------------------------------------------


@st.composite
def client_requests(draw: st.DrawFn, h: Harness, origins: tuple[str, ...]) -> ClientRequest:
    # Half of the requests are built to pass (then broken a little, or replayed); the rest
    # are anything at all.
    good = draw(st.booleans())
    method = draw(st.sampled_from(("GET", "POST", "get") if good else METHODS))
    segments = draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=4))
    path = "/" + "/".join(segments)
    if good or draw(st.booleans()):
        path = draw(
            st.sampled_from(
                (
                    "/orders/7",
                    "/public/info",
                    "/pay/1",
                    "//orders//7",
                    "/orders/./7",
                    "/catalog/%2F..",
                    "/orders/%7E",
                )
            )
        )
    if draw(st.booleans()):
        path += draw(st.sampled_from(("?q=1", "?a=%2F&b", "?")))
    host = draw(st.sampled_from(HOSTS))
    claimed = draw(st.sampled_from(("http", "https")))
    proto = draw(st.sampled_from(("http", "https", None, "https,http")))

    kinds = ("bound", "unbound", "expired", "other-aud", "garbage", "none")
    kind = "bound" if good else draw(st.sampled_from(kinds))
    makers: dict[str, Callable[[], str]] = {
        "bound": lambda: h.token(),
        "unbound": lambda: h.token(bound=False),
        "expired": lambda: h.token(now=NOW - 600, ttl=60),
        "other-aud": lambda: h.token(aud="spiffe://demo.local/ns/x/sa/y"),
        "garbage": lambda: "abc.def.ghi",
        "none": lambda: "",
    }
    token = makers[kind]()
    headers: list[tuple[str, str]] = []
    if token:
        auth_scheme = draw(st.sampled_from(("DPoP", "Bearer", "dpop")))
        headers += [("authorization", f"{auth_scheme} {token}")] * draw(st.integers(1, 2))
    proofs = ("honest", "claimed-scheme", "other", "garbage", "none")
    proof_kind = draw(st.sampled_from(("honest", "honest", "other") if good else proofs))
    if proof_kind == "garbage":
        headers += [("dpop", "x.y.z")]
    elif proof_kind != "none":
        connection = proto if proto in ("http", "https") else DEFAULT_SCHEME
        own = f"{connection}://{host}"
        if proof_kind == "honest":
            origin = draw(st.sampled_from((own, *origins)))
            proof_path = path.split("?", 1)[0]
        elif proof_kind == "claimed-scheme":
            origin, proof_path = f"{claimed}://{host}", path.split("?", 1)[0]
        else:
            other = f"{draw(st.sampled_from(('http', 'https')))}://{draw(st.sampled_from(HOSTS))}"
            origin = draw(st.sampled_from((other, *origins)))
            proof_path = draw(st.sampled_from(("/orders/7", path.replace("//", "/"), "/admin")))
        proof = h.client.proof(
            method=draw(st.sampled_from((method, "GET"))),
            url=origin + proof_path,
            now=NOW,
            access_token=token or None,
        )
        headers += [("dpop", proof)] * draw(st.integers(1, 2))
    extras = draw(
        st.lists(
            st.sampled_from(
                (
                    ("x-workload-id", "spiffe://evil/spoofed"),
                    ("x-workload-role", "admin"),
                    ("x-request-id", "r-1"),
                    ("x-http-method-override", "DELETE"),
                    ("x-forwarded-proto", "https"),
                    ("content-type", "text/plain"),
                )
            ),
            max_size=4,
        )
    )
    headers += extras
    order = draw(st.permutations(range(len(headers))))
    return ClientRequest(method, path, host, claimed, proto, tuple(headers[i] for i in order))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"authorities": frozenset({"https://orders.demo.local", "http://127.0.0.1:10000"})}],
    ids=["host-origin", "authorities"],
)
def test_grpc_and_http_adapters_decide_identically(overrides: dict[str, Any]) -> None:
    transports = Transports(**overrides)
    origins = tuple(sorted(overrides.get("authorities", ())))
    seen: set[tuple[bool, str | None]] = set()

    # Derandomized: the same examples every run, so the coverage check below cannot flake.
    @settings(max_examples=100, derandomize=True)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        request = data.draw(client_requests(transports.grpc_side, origins))
        for _ in range(data.draw(st.integers(1, 2))):  # the second time: a replay
            grpc, http = asyncio.run(transports.answers(request))
            assert grpc == http, request
            seen.add((grpc["allowed"], grpc.get("reason")))

    check()
    # The generator reaches allows and the interesting denies, not only malformed requests.
    outcomes = {reason for allowed, reason in seen if not allowed}
    assert (True, None) in seen
    expected = {"htu_mismatch", "replayed", "policy_denied", "proof_invalid", "htm_mismatch"}
    if origins:
        expected.add("unknown_authority")
    assert expected <= outcomes, seen
