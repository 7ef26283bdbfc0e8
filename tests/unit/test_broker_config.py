"""The broker's configuration (sidecar.broker.config): defaults, and errors that name the key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.broker.config import parse_broker_config
from sidecar.errors import ConfigError

UNIX_ENTRY = {"spiffe_id": "spiffe://t/a", "selectors": ["unix:uid:1"], "audiences": ["**"]}
CLUSTER = {"issuer": "https://k8s.example", "jwks_file": "/dev/null", "audiences": ["broker"]}


def test_defaults() -> None:
    cfg = parse_broker_config({"entries": [UNIX_ENTRY]})
    assert cfg.issuer == "http://127.0.0.1:8443" and cfg.listen == ("127.0.0.1", 8443)
    assert cfg.base_path == "" and cfg.scheme == "http"
    assert cfg.token_ttl == 300
    assert cfg.keys.schedule.alg == "ES256"
    assert cfg.keys.schedule.prepublish > 300, "longer than the authorizer's JWKS refresh"
    assert cfg.attestation_socket == "/tmp/sidecar-broker/attestation.sock"
    assert cfg.admin_socket == "/tmp/sidecar-broker/admin.sock"
    assert cfg.admin_listen == ("127.0.0.1", 15021)
    assert "ES256" in cfg.dpop.algorithms and cfg.dpop.max_age == 60
    assert cfg.max_token_ttl == 300


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"colour": "red"}, "colour"),
        ({"issuer": "http://127.0.0.1:8443/"}, "issuer"),
        ({"issuer": "ftp://x"}, "issuer"),
        ({"issuer": "http://x/?a=1"}, "issuer"),
        ({"listen": "8443"}, "listen"),
        ({"tokens": {"ttl": 0}}, "tokens.ttl"),
        ({"tokens": {"ttl": 100000}}, "tokens.ttl"),
        ({"keys": {"algorithm": "HS256"}}, "keys.algorithm"),
        ({"keys": {"rotate_every": 100, "prepublish": 100}}, "keys.prepublish"),
        ({"keys": {"rotate_every": 100, "prepublish": 0}}, "keys.prepublish"),
        (
            {"keys": {"rotate_every": 100, "prepublish": 50, "jwks_max_age": 60}},
            "keys.jwks_max_age",
        ),
        # 300 s tokens + 60 s grace, a new key every 5 s: ~74 keys published at once.
        ({"keys": {"rotate_every": 5, "prepublish": 2, "jwks_max_age": 1}}, "keys.rotate_every"),
        ({"keys": {"key_file": "/nonexistent/key.pem"}}, "keys.key_file"),
        ({"dpop": {"algorithms": ["none"]}}, "dpop.algorithms"),
        ({"dpop": {"algorithms": []}}, "dpop.algorithms"),
        ({"clusters": [{**CLUSTER, "algorithms": []}]}, "clusters[0].algorithms"),
        ({"attestation": {"socket": "relative.sock"}}, "attestation.socket"),
        ({"admin": {"socket": "/tmp/sidecar-broker/attestation.sock"}}, "admin.socket"),
        ({"revocation": {"max_wait": 61}}, "revocation.max_wait"),
        ({"revocation": {"max_wait": 1.5}}, "revocation.max_wait"),
        ({"revocation": {"max_waiting": 0}}, "revocation.max_waiting"),
        # Held long-polls may not take more than a quarter of the listener's connections.
        (
            {"connections": {"max_connections": 100}, "revocation": {"max_waiting": 26}},
            "revocation.max_waiting",
        ),
        ({"clusters": [{**CLUSTER, "discovery": True}]}, "clusters[0]"),
        ({"clusters": [{**CLUSTER, "audiences": []}]}, "clusters[0].audiences"),
        ({"clusters": [CLUSTER, CLUSTER]}, "clusters[1].issuer"),
        ({"clusters": [{**CLUSTER, "algorithms": ["HS256"]}]}, "clusters[0].algorithms"),
        (
            {
                "entries": [
                    {"spiffe_id": "spiffe://t/k", "selectors": ["k8s:ns:a"], "audiences": ["x"]}
                ]
            },
            "entries[0].selectors",
        ),  # k8s entry without a cluster
        (
            {
                "clusters": [CLUSTER],
                "entries": [
                    {
                        "spiffe_id": "spiffe://t/k",
                        "audiences": ["x"],
                        "selectors": ["k8s:ns:a", "k8s:cluster:https://other"],
                    }
                ],
            },
            "entries[0].selectors",
        ),
    ],
)
def test_errors_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_broker_config(data)
    assert err.value.key == key, str(err.value)


def test_long_poll_bounds_default_within_the_connection_cap() -> None:
    cfg = parse_broker_config({"entries": [UNIX_ENTRY]})
    assert (cfg.revocation_max_wait, cfg.revocation_max_waiting) == (30, 256)
    small = parse_broker_config({"entries": [UNIX_ENTRY], "connections": {"max_connections": 40}})
    assert small.revocation_max_waiting == 10


def test_issuer_path_puts_endpoints_under_it() -> None:
    cfg = parse_broker_config({"issuer": "https://idp.example/broker"})
    assert cfg.base_path == "/broker" and cfg.scheme == "https"


def test_entry_ttl_extends_key_retention() -> None:
    cfg = parse_broker_config(
        {
            "entries": [{**UNIX_ENTRY, "ttl": 3600}],
            "keys": {"retire_grace": 10},
            "tokens": {"wit_ttl": 600},
        }
    )
    assert cfg.max_token_ttl == 3600
    assert cfg.keys.schedule.retain_for == 3610


def test_wit_ttl_extends_key_retention() -> None:
    # A WIT lives for hours: the key that signed it stays published as long.
    cfg = parse_broker_config({"keys": {"retire_grace": 10}})
    assert cfg.wit_ttl == 14400
    assert cfg.keys.schedule.retain_for == 14410
    with pytest.raises(ConfigError) as err:
        parse_broker_config({"tokens": {"wit_ttl": 90000}})
    assert err.value.key == "tokens.wit_ttl"


def _write_key(path: Path, mode: int) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    os.chmod(path, mode)


def test_key_file_is_loaded_and_must_be_private(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    _write_key(key, 0o600)
    cfg = parse_broker_config({"keys": {"key_file": str(key)}})
    assert cfg.keys.initial_key is not None
    assert "PRIVATE" not in repr(cfg.keys) and "EllipticCurve" not in repr(cfg.keys)
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError) as err:
        parse_broker_config({"keys": {"key_file": str(key)}})
    assert err.value.key == "keys.key_file" and "600" in str(err.value)


def test_key_file_must_fit_the_algorithm(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    _write_key(key, 0o600)
    with pytest.raises(ConfigError) as err:
        parse_broker_config({"keys": {"key_file": str(key), "algorithm": "RS256"}})
    assert err.value.key == "keys.key_file"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
    os.chmod(garbage, 0o600)
    with pytest.raises(ConfigError) as err:
        parse_broker_config({"keys": {"key_file": str(garbage)}})
    assert "c2VjcmV0" not in str(err.value), "key material must not be echoed"
