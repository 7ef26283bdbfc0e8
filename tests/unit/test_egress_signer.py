"""The egress hot-path signer makes proofs interchangeable with ProofSigner's: same header,
same claims, verified by the RFC 9449 §4.3 verifier."""

from __future__ import annotations

import json

from factory import ec_key

from sidecar.identity.key import EgressProofSigner
from sidecar.jose.b64 import b64url_decode
from sidecar.jose.rfc9449_dpop import (
    DPoPPolicy,
    ProofKeyCache,
    ProofSigner,
    access_token_hash,
    verify_proof,
)

NOW = 1_700_000_000.0
TOKEN = "header.payload.signature"


def _segments(proof: str) -> tuple[dict[str, object], dict[str, object]]:
    head, body, _ = proof.split(".")
    return json.loads(b64url_decode(head)), json.loads(b64url_decode(body))


def test_same_header_and_claims_as_proof_signer() -> None:
    key = ec_key(3)
    fast, plain = EgressProofSigner(key), ProofSigner(key)
    url = "http://orders.local:8080/orders/42?x=1#f"
    a = fast.proof(method="POST", url=url, now=NOW, access_token=TOKEN, nonce="n-1", jti="j")
    b = plain.proof(method="POST", url=url, now=NOW, access_token=TOKEN, nonce="n-1", jti="j")
    assert _segments(a) == _segments(b)
    _, claims = _segments(a)
    assert claims["htu"] == "http://orders.local:8080/orders/42"
    assert claims["ath"] == access_token_hash(TOKEN)
    assert fast.thumbprint == plain.thumbprint


def test_proofs_verify_and_jtis_are_unique() -> None:
    signer = EgressProofSigner(ec_key(4))
    url = "http://orders.local/orders"
    jtis = set()
    for token in (TOKEN, TOKEN, "another.token.value"):  # the cached ath must follow the token
        proof = signer.proof(method="GET", url=url, now=NOW, access_token=token)
        verified = verify_proof(
            proof,
            method="GET",
            url=url,
            access_token=token,
            expected_jkt=signer.thumbprint,
            now=NOW,
            policy=DPoPPolicy(algorithms=frozenset({"ES256"})),
            key_cache=ProofKeyCache(),
        )
        jtis.add(verified.jti)
    assert len(jtis) == 3


def test_der_signatures_unpack_to_r_and_s_at_every_length() -> None:
    """r and s of 1 to 32 bytes, with and without DER's leading zero (high bit set)."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from sidecar.identity.key import der_to_raw_p256

    n = 2**256 - 2**224 + 2**192 - 89188191075325690597107910205041859247  # P-256 order
    values = [1, 0x7F, 0x80, 0xFF, 2**255 - 1, 2**255, n - 1, 0x80 << 240, 0x01 << 248]
    for r in values:
        for s in values:
            raw = der_to_raw_p256(encode_dss_signature(r, s))
            assert raw == r.to_bytes(32, "big") + s.to_bytes(32, "big"), (r, s)


def test_der_outside_the_expected_layout_goes_to_the_decoder() -> None:
    import pytest

    from sidecar.identity.key import der_to_raw_p256

    with pytest.raises(ValueError):
        der_to_raw_p256(b"\x30\x06\x02\x01\x01\x02\x01")  # truncated: not r||s, an error


def test_jtis_are_fresh_144_bit_values_across_pool_refills() -> None:
    signer = EgressProofSigner(ec_key(5))
    jtis = [
        _segments(signer.proof(method="GET", url="http://o/", now=NOW))[1]["jti"]
        for _ in range(2500)  # more than one pool of 1024
    ]
    assert len(set(jtis)) == len(jtis)
    assert all(isinstance(j, str) and len(b64url_decode(j)) == 18 for j in jtis)


def test_cached_members_follow_the_method_url_and_nonce_of_each_request() -> None:
    signer = EgressProofSigner(ec_key(6))
    calls = [
        ("GET", "http://o/a", "n-1"),
        ("POST", "http://o/a", "n-1"),
        ("POST", 'http://o/b"q', "n-2"),
        ("GET", "http://o/a", None),
        ("GET", "http://o/a", 'n"3\\'),
    ]
    for method, url, nonce in calls:
        _, claims = _segments(signer.proof(method=method, url=url, now=NOW, nonce=nonce))
        assert (claims["htm"], claims["htu"], claims.get("nonce")) == (method, url, nonce)
