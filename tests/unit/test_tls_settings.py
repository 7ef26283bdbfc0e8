"""TLS settings (sidecar.tls_settings) and the ``tls`` blocks of every configuration kind:
contexts that always verify, and load-time errors that name the key, the file and the fix."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from sidecar.authz.config import parse_authz_config
from sidecar.broker.config import parse_broker_config
from sidecar.config_util import parse_tls_client, parse_tls_server
from sidecar.egress.config import parse_egress_config
from sidecar.errors import ConfigError
from sidecar.identity.config import parse_identity_config
from sidecar.tls_settings import client_context, default_client_context, request_options
from tests.tls_pki import LocalPKI

ORDERS = "spiffe://demo.local/ns/shop/sa/orders"
UNIX_ENTRY = {"spiffe_id": "spiffe://t/a", "selectors": ["unix:uid:1"], "audiences": ["**"]}


@pytest.fixture(scope="module")
def pki(local_pki: LocalPKI) -> LocalPKI:
    return local_pki


def _strict(ctx: ssl.SSLContext) -> None:
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_client_contexts_always_verify(pki: LocalPKI) -> None:
    _strict(default_client_context())
    tls = parse_tls_client(
        {
            "ca_file": str(pki.ca_file),
            "cert_file": str(pki.client_cert),
            "key_file": str(pki.client_key),
            "server_name": "orders.internal",
        },
        "x.tls",
    )
    assert tls is not None
    _strict(tls.context)
    # Only the configured CA: the system store is not added to a private one.
    assert len(tls.context.get_ca_certs()) == 1
    assert tls.request_options() == {"ssl": tls.context, "server_hostname": "orders.internal"}
    assert request_options(None) == {"ssl": default_client_context()}
    assert parse_tls_client(None, "x.tls") is None


def test_server_context_requires_client_certificates_only_with_a_client_ca(
    pki: LocalPKI,
) -> None:
    pair = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    plain = parse_tls_server(pair, "tls")
    mutual = parse_tls_server({**pair, "client_ca_file": str(pki.ca_file)}, "tls")
    assert plain is not None and mutual is not None
    assert plain.context.verify_mode == ssl.CERT_NONE
    assert mutual.context.verify_mode == ssl.CERT_REQUIRED
    assert mutual.context.minimum_version >= ssl.TLSVersion.TLSv1_2


def _encrypted_key(pki: LocalPKI) -> str:
    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), None)
    path = pki.client_key.with_name("encrypted.key")
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return str(path)


CLIENT_ERRORS: list[tuple[Callable[[LocalPKI], dict[str, Any]], str, str]] = [
    (lambda p: {"ca_file": "/nonexistent/ca.pem"}, "x.tls.ca_file", "readable PEM file"),
    (lambda p: {"ca_file": str(p.client_key)}, "x.tls.ca_file", "does not parse"),
    (lambda p: {"cert_file": str(p.client_cert)}, "x.tls.key_file", "set together"),
    (lambda p: {"key_file": str(p.client_key)}, "x.tls.cert_file", "set together"),
    (
        lambda p: {"cert_file": str(p.client_cert), "key_file": str(p.server_key)},
        "x.tls.key_file",
        "does not match",
    ),
    (
        lambda p: {"cert_file": str(p.ca_file), "key_file": str(p.ca_file)},
        "x.tls.key_file",
        "does not parse",
    ),
    (
        lambda p: {"cert_file": str(p.client_cert), "key_file": _encrypted_key(p)},
        "x.tls.key_file",
        "encrypted",
    ),
    (lambda p: {"server_name": "https://orders"}, "x.tls.server_name", "host name"),
    (lambda p: {"verify": False}, "x.tls.verify", "known keys"),
]


@pytest.mark.parametrize(("block", "key", "fix"), CLIENT_ERRORS)
def test_client_block_errors_name_the_key_and_the_fix(
    pki: LocalPKI, block: Callable[[LocalPKI], dict[str, Any]], key: str, fix: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_tls_client(block(pki), "x.tls")
    assert info.value.key == key
    assert fix in str(info.value)


def test_server_block_needs_a_certificate(pki: LocalPKI) -> None:
    with pytest.raises(ConfigError) as info:
        parse_tls_server({"client_ca_file": str(pki.ca_file)}, "tls")
    assert info.value.key == "tls.cert_file"


def _egress(item: dict[str, Any]) -> Any:
    base = {"listen": "127.0.0.1:0", "audience": ORDERS}
    return parse_egress_config({"upstreams": [{**base, **item}]})


def test_every_config_kind_takes_a_tls_block(pki: LocalPKI) -> None:
    ca = {"ca_file": str(pki.ca_file)}
    up = _egress({"upstream": "https://orders.internal", "tls": ca}).upstreams[0]
    assert up.target.tls is not None and up.target.tls.ca_file == str(pki.ca_file)
    ident = parse_identity_config(
        {"issuer": "https://broker", "attestor": {"type": "k8s"}, "tls": ca}
    )
    assert ident.tls is not None
    authz = parse_authz_config(
        {
            "audience": ORDERS,
            "issuers": [{"issuer": "https://broker", "tls": ca}],
            "trust_domains": [
                {"name": "example.org", "bundle_endpoint": "https://b/bundle", "tls": ca}
            ],
            "revocation": {"url": "https://broker/revocations", "tls": ca},
        }
    )
    assert authz.sources[0].location.tls is not None
    assert authz.trust_domains[0].location.tls is not None
    assert authz.revocation_tls is not None
    cluster = {"issuer": "https://k8s", "audiences": ["broker"], "tls": ca}
    broker = parse_broker_config({"entries": [UNIX_ENTRY], "clusters": [cluster]})
    assert broker.clusters[0].location.tls is not None


@pytest.mark.parametrize(
    ("parse", "key"),
    [
        (lambda ca: _egress({"upstream": "http://orders", "tls": ca}), "egress.upstreams[0].tls"),
        (
            lambda ca: parse_authz_config(
                {"audience": ORDERS, "issuers": [{"issuer": "i", "jwks_file": "/j", "tls": ca}]}
            ),
            "authz.issuers[0].tls",
        ),
        (
            lambda ca: parse_authz_config(
                {
                    "audience": ORDERS,
                    "issuers": [{"issuer": "i", "jwks_file": "/j"}],
                    "revocation": {"tls": ca},
                }
            ),
            "authz.revocation.tls",
        ),
        (
            lambda ca: parse_authz_config(
                {
                    "audience": ORDERS,
                    "trust_domains": [{"name": "example.org", "bundle_file": "/b", "tls": ca}],
                }
            ),
            "authz.trust_domains[0].tls",
        ),
        (
            lambda ca: parse_identity_config({"attestor": {"type": "unix"}, "tls": ca}),
            "identity.tls",
        ),
    ],
)
def test_a_tls_block_that_would_go_unused_is_refused(
    pki: LocalPKI, parse: Callable[[dict[str, str]], Any], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse({"ca_file": str(pki.ca_file)})
    assert info.value.key == key


def test_broker_tls_makes_the_issuer_https(pki: LocalPKI) -> None:
    tls = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    cfg = parse_broker_config({"entries": [UNIX_ENTRY], "tls": tls})
    assert cfg.issuer == "https://127.0.0.1:8443" and cfg.scheme == "https"
    assert cfg.tls is not None and cfg.tls.client_ca_file is None
    with pytest.raises(ConfigError) as info:
        parse_broker_config({"entries": [UNIX_ENTRY], "tls": tls, "issuer": "http://b:8443"})
    assert info.value.key == "issuer"
    assert parse_broker_config({"entries": [UNIX_ENTRY]}).tls is None


def test_client_context_from_files_verifies_against_that_ca_only(pki: LocalPKI) -> None:
    ctx = client_context(str(pki.ca_file))
    (ca,) = ctx.get_ca_certs()
    assert (("commonName", "test CA"),) in ca["subject"]
