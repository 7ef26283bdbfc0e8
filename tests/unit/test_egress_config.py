"""Configuration of the egress and identity sections: what is accepted, and errors that name
the offending key."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.egress.config import parse_egress_config, parse_origin
from sidecar.errors import ConfigError
from sidecar.identity.config import parse_identity_config
from sidecar.jose.rfc9449_dpop import ProofSigner

AUD = "spiffe://demo.local/ns/shop/sa/orders"


def egress(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "upstreams": [
            {
                "name": "orders",
                "listen": "127.0.0.1:15001",
                "upstream": "http://127.0.0.1:10000/api/",
                "audience": AUD,
            }
        ]
    }
    cfg.update(over)
    return cfg


def test_egress_defaults_and_targets() -> None:
    cfg = parse_egress_config(egress())
    (up,) = cfg.upstreams
    assert up.listen == ("127.0.0.1", 15001)
    assert (up.target.origin, up.target.base_path) == ("http://127.0.0.1:10000", "/api")
    assert up.target.on_existing_authorization == "replace"
    assert cfg.x_forwarded == "keep" and cfg.via is True
    assert cfg.timeouts.connect == 5.0 and cfg.timeouts.total == 300.0
    assert cfg.nonce_retry_buffer == 65536
    assert cfg.audiences == [AUD]


def test_forward_proxy_destinations() -> None:
    cfg = parse_egress_config(
        egress(
            timeouts={"total": 0},
            forward_proxy={
                "listen": "127.0.0.1:15080",
                "destinations": [
                    {"match": "Orders.Shop", "audience": AUD},
                    {
                        "match": "pay.shop:8080",
                        "audience": "spiffe://x/pay",
                        "upstream": "https://pay.internal",
                        "on_existing_authorization": "keep",
                    },
                ],
            },
        )
    )
    assert cfg.timeouts.total is None
    fp = cfg.forward_proxy
    assert fp is not None
    assert fp.destinations[("orders.shop", 80)].target.origin == ""
    pay = fp.destinations[("pay.shop", 8080)].target
    assert pay.origin == "https://pay.internal" and pay.on_existing_authorization == "keep"
    assert cfg.audiences == [AUD, "spiffe://x/pay"]


@pytest.mark.parametrize(
    ("value", "origin"),
    [
        ("http://127.0.0.1:80", ("http://127.0.0.1", "")),
        ("https://Example.com:8443/", ("https://example.com:8443", "")),
        ("http://[::1]:9000/base", ("http://[::1]:9000", "/base")),
    ],
)
def test_origins(value: str, origin: tuple[str, str]) -> None:
    assert parse_origin(value, "k") == origin


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"on_existing_authorization": "drop"}, "egress.on_existing_authorization"),
        ({"x_forwarded": "maybe"}, "egress.x_forwarded"),
        ({"bogus": 1}, "egress.bogus"),
        ({"timeouts": {"connect": -1}}, "egress.timeouts.connect"),
        (
            {"upstreams": [{"listen": "127.0.0.1:1", "upstream": "ftp://x", "audience": "a"}]},
            "egress.upstreams[0].upstream",
        ),
        (
            {"upstreams": [{"listen": "nope", "upstream": "http://x", "audience": "a"}]},
            "egress.upstreams[0].listen",
        ),
        (
            {"upstreams": [{"listen": "127.0.0.1:1", "upstream": "http://x"}]},
            "egress.upstreams[0].audience",
        ),
        (
            {"upstreams": [{"listen": "127.0.0.1:1", "upstream": "http://u:p@x", "audience": "a"}]},
            "egress.upstreams[0].upstream",
        ),
        (
            {"forward_proxy": {"listen": "127.0.0.1:0", "destinations": []}},
            "egress.forward_proxy.destinations",
        ),
        (
            {
                "forward_proxy": {
                    "listen": "127.0.0.1:0",
                    "destinations": [
                        {"match": "a:80", "audience": "x"},
                        {"match": "A", "audience": "y"},
                    ],
                }
            },
            "egress.forward_proxy.destinations[1].match",
        ),
        (
            {
                "upstreams": [
                    {
                        "name": "orders",
                        "listen": "127.0.0.1:1",
                        "upstream": "http://x",
                        "audience": "a",
                    },
                ],
                "forward_proxy": {
                    "listen": "127.0.0.1:0",
                    "destinations": [{"match": "b:80", "audience": "x", "name": "orders"}],
                },
            },
            "egress.forward_proxy.destinations[0].name",
        ),
    ],
)
def test_egress_errors_name_the_key(change: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_egress_config(egress(**change))
    assert info.value.key == key, str(info.value)


def test_identity_config_unix_and_extra_audiences() -> None:
    cfg = parse_identity_config(
        {
            "attestor": {"type": "unix", "socket": "/run/broker.sock"},
            "audiences": ["a"],
            "refresh": {"min_remaining": 2, "backoff_max": 10},
        },
        extra_audiences=["a", "b"],
    )
    assert cfg.attestor.socket == "/run/broker.sock"
    assert cfg.audiences == ("a", "b")
    assert cfg.policy.min_remaining == 2 and cfg.policy.backoff_max == 10
    assert cfg.require_dpop is True


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({}, "identity.attestor.type"),
        ({"attestor": {"type": "spire"}}, "identity.attestor.type"),
        ({"attestor": {"type": "unix", "socket": ""}}, "identity.attestor.socket"),
        (
            {"attestor": {"type": "unix", "socket": "/s", "token_file": "/t"}},
            "identity.attestor.token_file",
        ),
        ({"attestor": {"type": "k8s"}}, "identity.issuer"),
        ({"issuer": "ldap://x", "attestor": {"type": "k8s"}}, "identity.issuer"),
        ({"attestor": {"type": "file"}}, "identity.attestor.path"),
        ({"attestor": {"type": "spiffe", "socket": "/run/agent.sock"}}, "identity.attestor.socket"),
        ({"attestor": {"type": "spiffe", "path": "/t"}}, "identity.attestor.path"),
        (
            {"attestor": {"type": "file", "path": "/t"}, "refresh": {"jitter": 2}},
            "identity.refresh.jitter",
        ),
        (
            {"attestor": {"type": "file", "path": "/t"}, "refresh": {"backoff_max": 0.1}},
            "identity.refresh.backoff_max",
        ),
        (
            {"attestor": {"type": "file", "path": "/t"}, "refresh": {"sooner": 1}},
            "identity.refresh.sooner",
        ),
    ],
)
def test_identity_errors_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_identity_config(data)
    assert info.value.key == key, str(info.value)


def test_spiffe_attestor_socket_defaults_to_the_environment() -> None:
    from sidecar.identity.spiffe_attestor import SpiffeAttestor

    default = parse_identity_config({"attestor": {"type": "spiffe"}})
    assert default.attestor.socket is None  # SPIFFE_ENDPOINT_SOCKET, read at first use
    cfg = parse_identity_config({"attestor": {"type": "spiffe", "socket": "unix:///run/a.sock"}})
    assert cfg.attestor.socket == "unix:///run/a.sock"
    assert isinstance(
        cfg.build_attestor(ProofSigner(ec.generate_private_key(ec.SECP256R1()))), SpiffeAttestor
    )


def test_the_example_configuration_is_valid() -> None:
    from pathlib import Path

    from sidecar.config_util import load_yaml_file

    data = load_yaml_file(Path(__file__).resolve().parents[2] / "examples" / "sidecar.yaml")
    eg = parse_egress_config(data["egress"])
    ident = parse_identity_config(data["identity"], extra_audiences=eg.audiences)
    assert ident.audiences == (AUD,)
    assert ident.attestor.kind == "unix"
    assert eg.upstreams[0].listen == ("127.0.0.1", 15001)
