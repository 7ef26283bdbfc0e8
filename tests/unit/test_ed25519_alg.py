"""RFC 9864 names Ed25519 signatures "Ed25519"; current clients (panva dpop, oauth4webapi,
joserfc) send that name. It is accepted wherever "EdDSA" was: allowlists, key fit, JWK alg,
configuration, the broker's keys and discovery."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed448
from factory import (
    NOW,
    Issuer,
    ec_key,
    ed_key,
    key_store,
    make_broker,
    make_harness,
    settings,
)
from jwcrypto import jwk as jc_jwk
from jwcrypto import jwt as jc_jwt

from sidecar.authz.config import parse_authz_config
from sidecar.authz.decision import Allow, Deny
from sidecar.broker.config import parse_broker_config
from sidecar.broker.keys import generate_private_key
from sidecar.errors import AuthError, Reason
from sidecar.jose.b64 import b64url_decode
from sidecar.jose.rfc7515_jws import parse_compact, sign_compact
from sidecar.jose.rfc7517_jwk import import_public_jwk, public_jwk_dict
from sidecar.jose.rfc7518_algorithms import key_fits_algorithm, verify_signature
from sidecar.jose.rfc9068_access_token import verify_access_token
from sidecar.jose.rfc9449_dpop import ProofSigner, access_token_hash

TOKEN_URL = "http://127.0.0.1:8443/token"


def test_ingress_accepts_a_proof_named_ed25519_by_our_signer() -> None:
    h = make_harness()
    signer = ProofSigner(ed_key(5), "Ed25519")
    token = h.token(jkt=signer.thumbprint)
    request = h.dpop_request(token=token, signer=signer)
    assert parse_compact(request.headers["dpop"], max_bytes=4096).header["alg"] == "Ed25519"
    assert isinstance(h.decide(request), Allow)


def test_ingress_accepts_a_proof_named_ed25519_by_jwcrypto() -> None:
    h = make_harness()
    private = ed_key(6)
    key = jc_jwk.JWK.from_pyca(private)
    public = json.loads(key.export_public())
    token = h.token(jkt=key.thumbprint())
    claims = {
        "jti": "jwcrypto-ed25519",
        "htm": "GET",
        "htu": "https://orders.demo.local/orders",
        "iat": int(NOW),
        "ath": access_token_hash(token),
    }
    proof = jc_jwt.JWT(header={"typ": "dpop+jwt", "alg": "Ed25519", "jwk": public}, claims=claims)
    proof.make_signed_token(key)
    request = h.dpop_request(token=token, headers={"dpop": proof.serialize()})
    assert isinstance(h.decide(request), Allow)


def test_the_challenge_and_defaults_name_both() -> None:
    h = make_harness()
    deny = h.decide(h.dpop_request(headers={"authorization": "Basic x"}))
    assert isinstance(deny, Deny)
    challenge = dict(deny.headers)["www-authenticate"]
    assert "Ed25519" in challenge and "EdDSA" in challenge


@pytest.mark.parametrize(
    ("allowed", "alg", "ok"),
    [
        (["EdDSA"], "Ed25519", True),  # EdDSA (any curve) covers the specific name
        (["Ed25519"], "Ed25519", True),
        (["Ed25519"], "EdDSA", False),  # ...not the reverse: EdDSA would admit Ed448 too
        (["ES256"], "Ed25519", False),
    ],
)
def test_issuer_allowlist(allowed: list[str], alg: str, ok: bool) -> None:
    cfg = parse_authz_config(
        {
            "audience": "aud",
            "issuers": [
                {
                    "issuer": "https://ed.example",
                    "jwks_uri": "https://ed.example/k",
                    "algorithms": allowed,
                }
            ],
        }
    )
    issuer = Issuer("https://ed.example", alg, "ed-k", ed_key(7), frozenset())
    token = issuer.token(aud="aud")
    kwargs: dict[str, Any] = {
        "issuers": cfg.settings.issuers,
        "keys": key_store(issuer),
        "audiences": frozenset({"aud"}),
        "now": NOW,
        "leeway": 5.0,
        "max_bytes": 8192,
    }
    if ok:
        assert verify_access_token(token, **kwargs).alg == alg
    else:
        with pytest.raises(AuthError) as err:
            verify_access_token(token, **kwargs)
        assert err.value.reason is Reason.ALG_NOT_ALLOWED


def test_ed25519_fits_only_ed25519_keys() -> None:
    ed448_key = ed448.Ed448PrivateKey.generate()
    assert key_fits_algorithm(ed_key(1).public_key(), "Ed25519")
    assert not key_fits_algorithm(ed448_key.public_key(), "Ed25519")
    assert key_fits_algorithm(ed448_key.public_key(), "EdDSA")
    assert not key_fits_algorithm(ec_key(1).public_key(), "Ed25519")
    h64, p64, s64 = sign_compact(ed448_key, "EdDSA", {"a": 1}).split(".")
    signing_input, signature = f"{h64}.{p64}".encode(), b64url_decode(s64)
    assert verify_signature("EdDSA", ed448_key.public_key(), signing_input, signature)
    assert not verify_signature("Ed25519", ed448_key.public_key(), signing_input, signature)


@pytest.mark.parametrize(("declared", "used"), [("EdDSA", "Ed25519"), ("Ed25519", "EdDSA")])
def test_a_jwk_alg_of_either_name_serves_the_other(declared: str, used: str) -> None:
    jwk = import_public_jwk(public_jwk_dict(ed_key(8), alg=declared))
    assert jwk.usable_with(used)
    assert not jwk.usable_with("ES256")


def test_settings_with_only_ed25519() -> None:
    cfg = parse_authz_config(
        {
            "audience": "a",
            "issuers": [{"issuer": "https://i.example", "jwks_uri": "https://i.example/k"}],
            "dpop": {"algorithms": ["Ed25519"]},
        }
    )
    assert cfg.settings.dpop.algorithms == frozenset({"Ed25519"})
    assert settings().dpop.algorithms >= {"Ed25519", "EdDSA"}


def test_broker_discovery_and_proofs() -> None:
    broker = make_broker()
    doc = json.loads(broker.discovery)
    assert {"Ed25519", "EdDSA"} <= set(doc["dpop_signing_alg_values_supported"])
    proof = ProofSigner(ed_key(9), "Ed25519").proof(method="POST", url=TOKEN_URL, now=NOW)
    assert broker.verify_dpop([proof], TOKEN_URL, NOW).jti


def test_broker_signs_with_ed25519() -> None:
    cfg = parse_broker_config({"entries": [], "keys": {"algorithm": "Ed25519"}})
    assert cfg.keys.schedule.alg == "Ed25519"
    private = generate_private_key("Ed25519")
    assert key_fits_algorithm(private.public_key(), "Ed25519")
    broker = make_broker(keys={"algorithm": "Ed25519"})
    assert json.loads(broker.discovery)["id_token_signing_alg_values_supported"] == ["Ed25519"]
    jwks = json.loads(broker.jwks()[0])
    assert [k["alg"] for k in jwks["keys"]] == ["Ed25519"]
