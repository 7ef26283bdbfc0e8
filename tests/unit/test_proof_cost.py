"""Cheap before expensive (issue: a proof's signature was verified before its key was compared
with cnf.jkt, and any RSA exponent was accepted): a proof that is refused for its structure,
binding or claims never costs a signature verification, and keys that are weak or expensive to
verify with are refused at import, for proofs, JWKS and the broker alike."""

from __future__ import annotations

from typing import Any

import pytest
from factory import DROP, NOW, Harness, ed_key, encode_segment, make_harness, rsa_key

from sidecar.authz.decision import Deny
from sidecar.errors import AuthError, Reason
from sidecar.jose import rfc9449_dpop
from sidecar.jose.b64 import b64url_decode, b64url_encode
from sidecar.jose.rfc7517_jwk import JWKError, import_jwks, import_public_jwk, public_jwk_dict
from sidecar.jose.rfc7518_algorithms import verify_signature
from sidecar.jose.rfc7638_thumbprint import jwk_thumbprint
from sidecar.jose.rfc8032_ed25519 import is_acceptable_public_key
from sidecar.jose.rfc9449_dpop import DPoPPolicy, ProofKeyCache, verify_proof

_P = 2**255 - 19


class Counter:
    def __init__(self, real: Any) -> None:
        self.real, self.calls = real, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.fixture
def h() -> Harness:
    return make_harness()


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> Counter:
    counter = Counter(verify_signature)
    monkeypatch.setattr(rfc9449_dpop, "verify_signature", counter)
    return counter


@pytest.fixture
def imports(monkeypatch: pytest.MonkeyPatch) -> Counter:
    counter = Counter(import_public_jwk)
    monkeypatch.setattr(rfc9449_dpop, "import_public_jwk", counter)
    return counter


def _rsa_jwk(n: int, e: int) -> dict[str, str]:
    def enc(v: int) -> str:
        return b64url_encode(v.to_bytes((v.bit_length() + 7) // 8, "big"))

    return {"kty": "RSA", "n": enc(n), "e": enc(e)}


def test_proof_for_another_key_is_refused_before_import_and_signature(
    h: Harness, verifications: Counter, imports: Counter
) -> None:
    token = h.token()  # bound to h.client
    deny = h.decide(h.dpop_request(token=token, signer=h.other_client))
    assert isinstance(deny, Deny) and deny.reason is Reason.PROOF_KEY_MISMATCH
    assert (verifications.calls, imports.calls) == (0, 0)


@pytest.mark.parametrize(
    ("proof_kw", "reason"),
    [
        ({"method": "POST"}, Reason.HTM_MISMATCH),
        ({"url": "https://elsewhere.example/orders"}, Reason.HTU_MISMATCH),
        ({"now": NOW - 3600}, Reason.IAT_OUT_OF_WINDOW),
        ({"token": "another.access.token"}, Reason.ATH_MISMATCH),
    ],
    ids=["htm", "htu", "iat", "ath"],
)
def test_claim_mismatches_cost_no_signature_verification(
    h: Harness, verifications: Counter, proof_kw: dict[str, Any], reason: Reason
) -> None:
    token = h.token()
    kw = dict(proof_kw)
    proof = h.proof(kw.pop("token", token), **kw)
    deny = h.decide(h.dpop_request(token=token, headers={"dpop": proof}))
    assert isinstance(deny, Deny) and deny.reason is reason, deny
    assert verifications.calls == 0
    # The same request done right costs exactly one.
    assert not isinstance(h.decide(h.dpop_request(token=token)), Deny)
    assert verifications.calls == 1


def test_proof_without_jti_costs_no_signature_verification(
    h: Harness, verifications: Counter
) -> None:
    token = h.token()
    proof = h.manual_proof(token, claims={"jti": DROP})
    deny = h.decide(h.dpop_request(token=token, headers={"dpop": proof}))
    assert isinstance(deny, Deny) and deny.reason is Reason.PROOF_INVALID
    assert verifications.calls == 0


def _unsigned_rsa_proof(jwk: dict[str, str]) -> str:
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": jwk}
    claims = {"jti": "j", "htm": "POST", "htu": "http://b.example/token", "iat": int(NOW)}
    return f"{encode_segment(header)}.{encode_segment(claims)}.{b64url_encode(b'x' * 256)}"


def test_huge_exponent_rsa_proof_is_refused_without_verification(verifications: Counter) -> None:
    n = rsa_key("client").public_key().public_numbers().n
    proof = _unsigned_rsa_proof(_rsa_jwk(n, n - 2))  # a 2048-bit exponent: ~8 ms a verify
    with pytest.raises(AuthError) as err:
        verify_proof(
            proof,
            method="POST",
            url="http://b.example/token",
            access_token=None,
            expected_jkt=None,  # the broker's case: no token to bind to
            now=NOW,
            policy=DPoPPolicy(),
            key_cache=ProofKeyCache(),
        )
    assert err.value.reason is Reason.PROOF_INVALID
    assert "exponent" in err.value.detail
    assert verifications.calls == 0


@pytest.mark.parametrize(
    ("bits", "e"),
    [(2048, 2**32 + 15), (2048, 2**64 + 1), (8192, 65537), (1024, 65537)],
    ids=["e-just-above-2^32", "e-2^64", "n-8192", "n-1024"],
)
def test_rsa_key_bounds_apply_to_every_import(bits: int, e: int) -> None:
    n = (1 << (bits - 1)) | 0xF1  # only the size matters: refused before any use
    if bits == 2048:
        n = rsa_key("client").public_key().public_numbers().n
    jwk = _rsa_jwk(n, e)
    with pytest.raises(JWKError):
        import_public_jwk(jwk)
    # JWKS loading (ingress issuers, the broker's clusters) skips such a key.
    assert import_jwks({"keys": [jwk]}) == []


def test_rsa_exponent_up_to_2_32_and_65537_are_accepted() -> None:
    n = rsa_key("client").public_key().public_numbers().n
    assert import_public_jwk(_rsa_jwk(n, 65537)).kty == "RSA"
    assert import_public_jwk(_rsa_jwk(n, 2**32 - 1)).kty == "RSA"
    assert import_public_jwk(public_jwk_dict(rsa_key("client"))).kty == "RSA"


def _ed(y: int, sign: int = 0) -> bytes:
    return (y | (sign << 255)).to_bytes(32, "little")


#: The small-order points of edwards25519 (orders 1, 2, 4 and 8) and non-canonical encodings.
SMALL_ORDER_OR_NON_CANONICAL = {
    "identity": _ed(1),
    "order-2": _ed(_P - 1),
    "order-4": _ed(0),
    "order-4-neg": _ed(0, 1),
    "order-8-a": bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    "order-8-b": bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    "order-8-a-neg": bytes.fromhex(
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85"
    ),
    "identity-minus-zero": _ed(1, 1),
    "y-equals-p": _ed(_P),
    "y-equals-p-plus-1": _ed(_P + 1),
    "y-all-ones": _ed(2**255 - 1),
    "off-curve": _ed(2),
}


@pytest.mark.parametrize(
    "raw", SMALL_ORDER_OR_NON_CANONICAL.values(), ids=list(SMALL_ORDER_OR_NON_CANONICAL)
)
def test_ed25519_small_order_and_non_canonical_keys_are_refused(raw: bytes) -> None:
    assert not is_acceptable_public_key(raw)
    with pytest.raises(JWKError):
        import_public_jwk({"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)})


def test_ed25519_real_keys_are_accepted() -> None:
    for seed in range(20):
        jwk = public_jwk_dict(ed_key(seed))
        assert import_public_jwk(jwk).kty == "OKP"


def test_small_order_ed25519_proof_is_refused(h: Harness, verifications: Counter) -> None:
    bad_jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(_ed(1))}
    token = h.token(jkt=jwk_thumbprint(bad_jwk))  # the token even names that key
    proof = h.manual_proof(token, header={"jwk": bad_jwk}, key=ed_key(3), alg="EdDSA")
    deny = h.decide(h.dpop_request(token=token, headers={"dpop": proof}))
    assert isinstance(deny, Deny) and deny.reason is Reason.PROOF_INVALID, deny
    assert verifications.calls == 0


def test_off_curve_ec_proof_key_is_refused_at_import(h: Harness, verifications: Counter) -> None:
    # cryptography checks the point when the key is built: such a key never reaches a verify.
    jwk = dict(h.client.public_jwk)
    y = int.from_bytes(b64url_decode(jwk["y"]), "big")
    jwk["y"] = b64url_encode(((y + 1) % 2**256).to_bytes(32, "big"))
    with pytest.raises(JWKError):
        import_public_jwk(jwk)
    token = h.token(jkt=jwk_thumbprint(jwk))  # even a token bound to that very key
    proof = h.manual_proof(token, header={"jwk": jwk})
    deny = h.decide(h.dpop_request(token=token, headers={"dpop": proof}))
    assert isinstance(deny, Deny) and deny.reason is Reason.PROOF_INVALID, deny
    assert "jwk" in deny.detail and verifications.calls == 0
