"""Egress header rules (RFC 9110 §7.6.1 hop-by-hop, X-Forwarded-*, Via, credentials) and the
DPoP nonce challenge parsing / per-origin cache (RFC 9449 §9). Sans-IO."""

from __future__ import annotations

import pytest

from sidecar.egress.headers import connection_options, request_headers, response_headers
from sidecar.egress.nonce import NonceCache, is_use_dpop_nonce, parse_challenges

APP_REQUEST = [
    ("Host", "127.0.0.1:15001"),
    ("Connection", "keep-alive, X-Secret-Hop"),
    ("Connection", "Upgrade"),
    ("X-Secret-Hop", "1"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Authorization", "Basic cHJveHk6cHc="),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Transfer-Encoding", "chunked"),
    ("Upgrade", "websocket"),
    ("Expect", "100-continue"),
    ("Authorization", "Basic YXBwOnB3"),
    ("DPoP", "app-proof"),
    ("Content-Length", "12"),
    ("Accept", "application/json"),
    ("Cookie", "a=1"),
    ("Cookie", "b=2"),
    ("X-Forwarded-For", "10.0.0.9"),
    ("X-Forwarded-Proto", "https"),
    ("Forwarded", "for=10.0.0.9"),
]


def names(headers: object) -> list[str]:
    return [k.lower() for k, _ in headers.items()]  # type: ignore[attr-defined]


def test_hop_by_hop_and_connection_listed_fields_are_removed() -> None:
    out = request_headers(APP_REQUEST, drop_credentials=True, via=None)
    assert set(names(out)) == {
        "content-length",
        "accept",
        "cookie",
        "x-forwarded-for",
        "x-forwarded-proto",
        "forwarded",
    }
    assert out.getall("Cookie") == ["a=1", "b=2"], "repeated fields keep order and count"


def test_credentials_are_kept_only_when_asked() -> None:
    kept = request_headers(APP_REQUEST, drop_credentials=False, via=None)
    assert kept["Authorization"] == "Basic YXBwOnB3" and kept["DPoP"] == "app-proof"


def test_x_forwarded_policies() -> None:
    keep = request_headers(APP_REQUEST, drop_credentials=True, x_forwarded="keep", peer="127.0.0.1")
    assert keep["X-Forwarded-For"] == "10.0.0.9" and "Forwarded" in keep
    strip = request_headers(APP_REQUEST, drop_credentials=True, x_forwarded="strip")
    assert not any(n.startswith("x-forwarded") or n == "forwarded" for n in names(strip))
    append = request_headers(
        APP_REQUEST, drop_credentials=True, x_forwarded="append", peer="127.0.0.1", proto="http"
    )
    assert append["X-Forwarded-For"] == "10.0.0.9, 127.0.0.1"
    assert append["X-Forwarded-Proto"] == "http"
    assert append["X-Forwarded-Host"] == "127.0.0.1:15001"


def test_via_is_appended() -> None:
    out = request_headers([("Via", "1.0 fred")], drop_credentials=True, via="1.1 sidecar")
    assert out.getall("Via") == ["1.0 fred, 1.1 sidecar"]


def test_response_hop_by_hop_removed_end_to_end_kept() -> None:
    upstream = [
        ("Connection", "close, X-Internal"),
        ("X-Internal", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authenticate", "Basic"),
        ("Content-Type", "application/json"),
        ("Content-Encoding", "gzip"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("DPoP-Nonce", "n1"),
        ("WWW-Authenticate", 'DPoP error="invalid_token"'),
    ]
    assert response_headers(upstream) == [
        ("Content-Type", "application/json"),
        ("Content-Encoding", "gzip"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("DPoP-Nonce", "n1"),
        ("WWW-Authenticate", 'DPoP error="invalid_token"'),
    ]


def test_connection_listed_fields_go_wherever_they_stand_and_however_spelled() -> None:
    app = [("x-early", "1"), ("X-Late", "2"), ("Connection", "X-EARLY, x-late"), ("X-Early", "3")]
    assert names(request_headers(app, drop_credentials=True, via=None)) == []
    upstream = [("x-early", "1"), ("Connection", "X-EARLY"), ("X-Kept", "2")]
    assert response_headers(upstream) == [("X-Kept", "2")]


def test_response_headers_the_caller_sets_itself_are_dropped() -> None:
    upstream = [("Content-Length", "2"), ("Content-Type", "text/plain"), ("Connection", "close")]
    assert response_headers(upstream, drop=frozenset({"content-length"})) == [
        ("Content-Type", "text/plain")
    ]
    assert response_headers(upstream) == [("Content-Length", "2"), ("Content-Type", "text/plain")]


def test_connection_options_parsing() -> None:
    assert connection_options(["close, X-A", " x-b ,,", ""]) == {"close", "x-a", "x-b"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('DPoP error="use_dpop_nonce", error_description="Resource server requires nonce"', True),
        ("dpop error=use_dpop_nonce", True),
        ('Bearer realm="x", DPoP algs="ES256", error="use_dpop_nonce"', True),
        ('Bearer error="use_dpop_nonce", DPoP algs="ES256"', False),  # not the DPoP challenge
        ('DPoP error="invalid_token"', False),
        ('Basic realm="use_dpop_nonce"', False),
        ('Negotiate abc123==, DPoP error="use_dpop_nonce"', True),
        ("", False),
        ("@@@", False),
    ],
)
def test_use_dpop_nonce_challenge(value: str, expected: bool) -> None:
    assert is_use_dpop_nonce([value]) is expected


def test_challenge_parser_keeps_params_and_unquotes() -> None:
    parsed = parse_challenges('DPoP algs="ES256 PS256", error="a\\"b", Bearer realm=x')
    assert parsed == [("DPoP", {"algs": "ES256 PS256", "error": 'a"b'}), ("Bearer", {"realm": "x"})]


def test_nonce_cache_per_origin_and_bounded() -> None:
    cache = NonceCache(capacity=2)
    assert cache.offer("http://a", "n1") is True
    assert cache.offer("http://a", "n1") is False  # not new
    assert cache.offer("http://a", 'bad"nonce') is False
    assert cache.get("http://a") == "n1"
    cache.offer("http://b", "n2")
    cache.offer("http://c", "n3")
    assert len(cache) == 2 and cache.get("http://a") is None and cache.get("http://c") == "n3"
