"""RFC test vectors, stored as data under ``vectors/`` with the RFC section they come from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.errors import AuthError, Reason
from sidecar.jose.b64 import b64url_decode
from sidecar.jose.rfc7515_jws import parse_compact
from sidecar.jose.rfc7517_jwk import import_public_jwk
from sidecar.jose.rfc7638_thumbprint import jwk_thumbprint
from sidecar.jose.rfc9449_dpop import DPoPPolicy, ProofKeyCache, access_token_hash, verify_proof

VECTORS = Path(__file__).parent / "vectors"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    assert data["source"].startswith("RFC "), f"{name}: every vector cites its RFC section"
    return data


THUMBPRINT_VECTORS = ["rfc7638_3_1_rsa_thumbprint.json", "rfc8037_a3_ed25519_thumbprint.json"]
PROOF_VECTORS = ["rfc9449_4_1_token_request_proof.json", "rfc9449_7_1_resource_request_proof.json"]


def test_every_vector_file_is_used_and_cites_its_source() -> None:
    files = sorted(p.name for p in VECTORS.glob("*.json"))
    assert files == sorted(THUMBPRINT_VECTORS + PROOF_VECTORS)
    for name in files:
        assert "Section" in load(name)["source"] or "Appendix" in load(name)["source"]


@pytest.mark.parametrize("name", THUMBPRINT_VECTORS, ids=lambda n: n.removesuffix(".json"))
def test_jwk_thumbprint(name: str) -> None:
    vector = load(name)
    assert jwk_thumbprint(vector["jwk"]) == vector["thumbprint"]
    # The imported key carries the same thumbprint.
    assert import_public_jwk(vector["jwk"]).thumbprint == vector["thumbprint"]


@pytest.mark.parametrize("name", THUMBPRINT_VECTORS, ids=lambda n: n.removesuffix(".json"))
def test_thumbprint_ignores_non_required_members(name: str) -> None:
    vector = load(name)
    decorated = {**vector["jwk"], "kid": "another", "use": "sig", "x5u": "https://x.example"}
    assert jwk_thumbprint(decorated) == vector["thumbprint"]


def _verify(vector: dict[str, Any], **overrides: Any) -> Any:
    claims = vector["claims"]
    kwargs: dict[str, Any] = {
        "method": vector["request"]["method"],
        "url": vector["request"]["url"],
        "access_token": vector.get("access_token"),
        "expected_jkt": vector["jkt"] if "access_token" in vector else None,
        "now": float(claims["iat"]),  # the clock frozen at the proof's own iat
        "policy": DPoPPolicy(algorithms=frozenset({"ES256"})),
        "key_cache": ProofKeyCache(),
    }
    kwargs.update(overrides)
    return verify_proof(vector["proof"], **kwargs)


@pytest.mark.parametrize("name", PROOF_VECTORS, ids=lambda n: n.removesuffix(".json"))
def test_rfc9449_proof_verifies(name: str) -> None:
    vector = load(name)
    verified = _verify(vector)
    claims = vector["claims"]
    assert verified.jkt == vector["jkt"]
    assert verified.jti == claims["jti"]
    assert verified.htm == claims["htm"]
    assert verified.htu == claims["htu"]
    assert verified.iat == claims["iat"]
    assert verified.nonce is None


@pytest.mark.parametrize("name", PROOF_VECTORS, ids=lambda n: n.removesuffix(".json"))
def test_rfc9449_proof_decodes_to_the_documented_content(name: str) -> None:
    vector = load(name)
    jws = parse_compact(vector["proof"], max_bytes=4096)
    assert jws.payload == vector["claims"]
    assert jws.header["typ"] == "dpop+jwt"
    assert jws.header["alg"] == "ES256"
    assert len(b64url_decode(vector["proof"].rsplit(".", 1)[1])) == 64  # raw R || S
    if "header" in vector:
        assert jws.header == vector["header"]
    # RFC 9449 §6.1: the jkt is the RFC 7638 thumbprint of the proof's jwk.
    assert jwk_thumbprint(jws.header["jwk"]) == vector["jkt"]


def test_rfc9449_7_1_ath_of_the_example_access_token() -> None:
    vector = load("rfc9449_7_1_resource_request_proof.json")
    assert access_token_hash(vector["access_token"]) == vector["ath"] == vector["claims"]["ath"]


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"method": "GET"}, Reason.HTM_MISMATCH),
        ({"url": "https://server.example.org/token"}, Reason.HTU_MISMATCH),
        ({"now": 1562262616.0 + 61}, Reason.IAT_OUT_OF_WINDOW),
        ({"now": 1562262616.0 - 6}, Reason.IAT_OUT_OF_WINDOW),
        ({"access_token": "another-token"}, Reason.ATH_MISMATCH),
        ({"expected_jkt": "A" * 43}, Reason.PROOF_KEY_MISMATCH),
        ({"policy": DPoPPolicy(algorithms=frozenset({"EdDSA"}))}, Reason.PROOF_INVALID),
    ],
    ids=[
        "other-method",
        "other-host",
        "too-old",
        "from-the-future",
        "other-token",
        "other-jkt",
        "alg-not-configured",
    ],
)
def test_rfc9449_4_1_proof_is_refused_for_another_request(
    override: dict[str, Any], reason: Reason
) -> None:
    vector = load("rfc9449_4_1_token_request_proof.json")
    with pytest.raises(AuthError) as info:
        _verify(vector, **override)
    assert info.value.reason is reason


def test_rfc9449_7_1_proof_with_its_access_token() -> None:
    """The §7.1 access token contains "~" and ".", so the core would call it malformed as a
    JWT; verify_proof takes it as the opaque string it is."""
    vector = load("rfc9449_7_1_resource_request_proof.json")
    verified = _verify(vector, access_token=vector["access_token"], expected_jkt=vector["jkt"])
    assert verified.jkt == vector["jkt"]
    with pytest.raises(AuthError) as info:
        _verify(vector, access_token=vector["access_token"] + "x")
    assert info.value.reason is Reason.ATH_MISMATCH


def test_rfc9449_proof_with_one_flipped_signature_byte_is_refused() -> None:
    vector = load("rfc9449_4_1_token_request_proof.json")
    head, _, sig = vector["proof"].rpartition(".")
    flipped = ("A" if sig[10] != "A" else "B").join((sig[:10], sig[11:]))
    with pytest.raises(AuthError) as info:
        _verify({**vector, "proof": f"{head}.{flipped}"})
    assert info.value.reason is Reason.PROOF_INVALID
