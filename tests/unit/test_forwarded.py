"""The request's scheme comes from what Envoy asserts about the connection (x-forwarded-proto),
read by one function for both transports, never from the client's ``:scheme``."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request
from envoy.service.auth.v3 import external_auth_pb2

from sidecar.authz.forwarded import connection_scheme
from sidecar.authz.grpc_server import view_from_check
from sidecar.authz.http_server import view_from_http


@pytest.mark.parametrize(
    ("headers", "default", "scheme"),
    [
        ({"x-forwarded-proto": "http"}, "https", "http"),
        ({"x-forwarded-proto": "https"}, "http", "https"),
        ({"x-forwarded-proto": " HTTPS "}, "http", "https"),
        ({}, "https", "https"),  # no header: the operator's default
        ({}, "http", "http"),
        ({"x-forwarded-proto": "https,http"}, "http", ""),  # a list: fail closed
        ({"x-forwarded-proto": "ftp"}, "http", ""),
        ({"x-forwarded-proto": ""}, "https", ""),
    ],
)
def test_connection_scheme(headers: dict[str, str], default: str, scheme: str) -> None:
    assert connection_scheme(headers, default) == scheme


def _check(scheme: str, headers: dict[str, str]) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host, http.scheme = "GET", "/orders", "orders.local", scheme
    http.headers.update(headers)
    return req


def test_grpc_view_ignores_the_clients_scheme() -> None:
    # An h2c client claims ":scheme: https"; Envoy says the connection is cleartext.
    view = view_from_check(_check("https", {"x-forwarded-proto": "http"}), "http")
    assert view.scheme == "http"
    assert view.url == "http://orders.local/orders"
    # Without x-forwarded-proto the configured default wins, still not the client's claim.
    assert view_from_check(_check("https", {}), "http").scheme == "http"


def test_http_view_reads_the_same_header() -> None:
    request = make_mocked_request(
        "GET", "/orders", headers={"Host": "orders.local", "X-Forwarded-Proto": "https"}
    )
    view = view_from_http(request, path_prefix="", default_scheme="http")
    assert view.scheme == "https"
    request = make_mocked_request("GET", "/orders", headers={"Host": "orders.local"})
    assert view_from_http(request, path_prefix="", default_scheme="https").scheme == "https"


def test_both_views_spell_the_method_alike() -> None:
    # aiohttp upper-cases the HTTP check's method; an HTTP/2 client may send ``get`` to Envoy.
    req = _check("http", {"x-forwarded-proto": "http"})
    req.attributes.request.http.method = "get"
    assert view_from_check(req, "http").method == "GET"
    request = make_mocked_request("get", "/orders", headers={"Host": "orders.local"})
    assert view_from_http(request, path_prefix="", default_scheme="http").method == "GET"
