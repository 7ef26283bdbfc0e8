"""Step 9 as the ingress applies it: ``authz.authorities`` (issue 14 item 4) and the path Envoy
forwards, ``//`` included (issue 14 item 10)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from factory import NOW, make_harness, view

from sidecar.authz.config import parse_authz_config
from sidecar.authz.decision import Allow, Deny
from sidecar.authz.target import forwarded_path, parse_authority
from sidecar.errors import ConfigError, Reason

ORDERS = "https://orders.demo.local"


@pytest.mark.parametrize(
    ("value", "origin"),
    [
        ("https://orders.demo.local", ORDERS),
        ("HTTPS://Orders.Demo.Local:443/", ORDERS),  # default port dropped, case folded
        ("http://127.0.0.1:10000", "http://127.0.0.1:10000"),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_parse_authority(value: str, origin: str) -> None:
    assert parse_authority(value) == origin


@pytest.mark.parametrize(
    "value",
    [
        "orders.demo.local",
        "ftp://x",
        "https://x/path",
        "https://x?q",
        "https://x#f",
        "https://user@x",
        "https://",
        "https://x:99999",
    ],
)
def test_parse_authority_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        parse_authority(value)


@pytest.mark.parametrize(
    ("path", "forwarded"),
    [
        ("/a/b", "/a/b"),
        ("/a//b", "/a/b"),
        ("//a///b/", "/a/b/"),
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/a/b/..", "/a/"),
        ("/../../a", "/a"),
        ("/a//../b", "/a/b"),  # dot segments first, as Envoy's normalize_path, then the merge
        ("/", "/"),
    ],
)
def test_forwarded_path(path: str, forwarded: str) -> None:
    assert forwarded_path(path) == forwarded


def _base(**extra: Any) -> dict[str, Any]:
    return {"audience": "spiffe://x/y", "issuers": [{"issuer": "https://i"}], **extra}


def test_config_normalizes_and_validates(caplog: pytest.LogCaptureFixture) -> None:
    cfg = parse_authz_config(_base(authorities=["HTTPS://Orders.demo.local:443", ORDERS]))
    assert cfg.settings.authorities == frozenset({ORDERS})
    with pytest.raises(ConfigError) as err:
        parse_authz_config(_base(authorities=[ORDERS, "https://orders.demo.local/api"]))
    assert err.value.key == "authz.authorities[1]"
    with pytest.raises(ConfigError):
        parse_authz_config(_base(authorities=[ORDERS, 443]))
    with caplog.at_level(logging.WARNING, "sidecar.authz.config"):
        assert parse_authz_config(_base()).settings.authorities == frozenset()
    assert "authz.authorities is not set" in caplog.text


def test_with_authorities_the_hosts_header_plays_no_part() -> None:
    h = make_harness(authorities=frozenset({ORDERS, "http://127.0.0.1:10000"}))
    token = h.token()
    proof = h.proof(token, url=f"{ORDERS}/orders")
    # Host and scheme of the request differ from the htu: the configured origin is what counts.
    request = view(
        path="/orders?x=1",
        authority="evil.example:1234",
        scheme="http",
        headers={"authorization": f"DPoP {token}", "dpop": proof},
    )
    assert isinstance(h.decide(request), Allow)
    # A proof for an origin that is not configured is refused, whatever Host says.
    token = h.token(jti="t2")
    proof = h.proof(token, url="https://evil.example/orders")
    request = view(
        path="/orders",
        authority="evil.example",
        headers={"authorization": f"DPoP {token}", "dpop": proof},
    )
    decision = h.decide(request)
    assert isinstance(decision, Deny) and decision.reason is Reason.UNKNOWN_AUTHORITY
    # The path must still be the request's.
    token = h.token(jti="t3")
    proof = h.proof(token, url=f"{ORDERS}/orders/other")
    request = view(path="/orders", headers={"authorization": f"DPoP {token}", "dpop": proof})
    decision = h.decide(request)
    assert isinstance(decision, Deny) and decision.reason is Reason.HTU_MISMATCH


def test_without_authorities_the_request_origin_counts() -> None:
    h = make_harness()
    token = h.token()
    proof = h.proof(token, url="https://evil.example/orders")
    decision = h.decide(
        view(path="/orders", headers={"authorization": f"DPoP {token}", "dpop": proof})
    )
    assert isinstance(decision, Deny) and decision.reason is Reason.HTU_MISMATCH


@pytest.mark.parametrize(
    ("htu_path", "forwarded"),
    [
        ("/orders//7", "/orders/7"),
        ("//orders/7", "/orders/7"),
        ("/orders/./7", "/orders/7"),
        ("/orders/x/../7", "/orders/7"),
        ("/orders/7", "/orders/7"),
    ],
)
@pytest.mark.parametrize("authorities", [frozenset(), frozenset({ORDERS})])
def test_htu_path_is_compared_as_envoy_forwards_it(
    htu_path: str, forwarded: str, authorities: frozenset[str]
) -> None:
    """The client asked for ``htu_path``; Envoy forwarded ``forwarded``: the proof matches."""
    h = make_harness(authorities=authorities)
    token = h.token()
    proof = h.proof(token, url=f"{ORDERS}{htu_path}")
    request = view(path=forwarded, headers={"authorization": f"DPoP {token}", "dpop": proof})
    assert isinstance(h.decide(request, NOW), Allow)


def test_merged_slashes_do_not_widen_the_match() -> None:
    h = make_harness()
    token = h.token()
    for htu_path, forwarded in [
        ("/orders/7", "/orders/8"),
        ("/orders7", "/orders/7"),
        ("/orders/7/", "/orders/7"),
    ]:
        proof = h.proof(token, url=f"{ORDERS}{htu_path}")
        request = view(path=forwarded, headers={"authorization": f"DPoP {token}", "dpop": proof})
        decision = h.decide(request)
        assert isinstance(decision, Deny) and decision.reason is Reason.HTU_MISMATCH, htu_path


@pytest.mark.parametrize("suffix", ["?", "?x", "#", "#/", "/", "@evil.example"])
def test_without_authorities_a_host_that_is_no_authority_is_refused(suffix: str) -> None:
    """The origin is built from the client's Host: one that ends the authority early ('?', '#',
    '/') would move the request's real path into a query or fragment, so a proof for ``/``
    would match any path. Envoy answers 400 to such a Host; the core does not rely on that."""
    h = make_harness()
    token = h.token()
    proof = h.proof(token, url=f"{ORDERS}/")
    request = view(
        path="/orders/7",
        authority=f"orders.demo.local{suffix}",
        headers={"authorization": f"DPoP {token}", "dpop": proof},
    )
    decision = h.decide(request)
    assert isinstance(decision, Deny) and decision.reason is Reason.HTU_MISMATCH, decision
