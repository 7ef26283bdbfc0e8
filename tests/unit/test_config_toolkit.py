"""One validator per rule, shared by every config kind: the same mistake gets the same answer
whether it sits in ``authz.issuers``, the broker's ``clusters`` or ``identity``."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.authz.config import parse_authz_config
from sidecar.broker.config import parse_broker_config
from sidecar.config_util import check_url
from sidecar.errors import ConfigError
from sidecar.identity.config import parse_identity_config

AUD = "spiffe://demo.local/ns/shop/sa/orders"


def _authz_issuer(issuer: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_authz_config({"audience": AUD, "issuers": [issuer]})
    return str(info.value).removeprefix("authz.issuers[0]")


def _broker_cluster(cluster: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_broker_config({"clusters": [{"audiences": ["sidecar"], **cluster}]})
    return str(info.value).removeprefix("clusters[0]")


@pytest.mark.parametrize(
    "item",
    [
        # neither, both, all three sources: one rule, one message
        {"issuer": "https://i.example", "discovery": False},
        {"issuer": "https://i.example", "jwks_file": "/k.json", "jwks_uri": "https://i.example/k"},
        {"issuer": "https://i.example", "jwks_file": "/k.json", "discovery": True},
        # a jwks_uri without a host passed the old prefix check in both copies
        {"issuer": "https://i.example", "jwks_uri": "https://"},
        {"issuer": "https://i.example", "jwks_uri": "ftp://i.example/k"},
        # discovery needs an issuer URL with a host
        {"issuer": "https:///no-host"},
        {"issuer": "i.example"},
        # an empty allowlist is refused on both sides
        {"issuer": "https://i.example", "jwks_uri": "https://i.example/k", "algorithms": []},
    ],
)
def test_issuer_and_cluster_share_one_rule(item: dict[str, Any]) -> None:
    assert _authz_issuer(item) == _broker_cluster(item)


def test_exactly_one_names_every_choice() -> None:
    message = _authz_issuer({"issuer": "https://i.example", "discovery": False})
    assert message == ": expected exactly one of jwks_file, jwks_uri or discovery: true"


@pytest.mark.parametrize(
    ("value", "bare", "ok"),
    [
        ("https://issuer.example", False, True),
        ("http://127.0.0.1:8443/tenant", True, True),
        ("https://issuer.example/", False, True),  # some issuers end with a slash
        ("https://issuer.example/", True, False),
        ("https://issuer.example?x=1", True, False),
        ("https://issuer.example#f", True, False),
        ("https://user@issuer.example", True, False),
        ("https://", False, False),
        ("issuer.example", False, False),
        ("unix:///run/x.sock", False, False),
    ],
)
def test_one_url_check(value: str, bare: bool, ok: bool) -> None:
    if ok:
        assert check_url(value, "k", bare=bare) == value
    else:
        with pytest.raises(ConfigError, match=r"^k: expected"):
            check_url(value, "k", bare=bare)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"issuer": "https://", "attestor": {"type": "unix"}}, "identity.issuer"),
        (
            {"attestor": {"type": "k8s", "token_endpoint": "http://"}},
            "identity.attestor.token_endpoint",
        ),
    ],
)
def test_identity_urls_need_a_host(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: expected an absolute http\(s\) URL"):
        parse_identity_config(data)
