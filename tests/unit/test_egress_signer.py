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
