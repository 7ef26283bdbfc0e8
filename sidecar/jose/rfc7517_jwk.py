"""JSON Web Keys (RFC 7517) and key sets: public-key import and export.

Only public keys are imported from the outside: a JWK carrying private members is refused
(RFC 9449 §4.2: the proof's ``jwk`` "MUST NOT contain a private key").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from sidecar.errors import SidecarError
from sidecar.jose.b64 import b64url_encode
from sidecar.jose.rfc7518_algorithms import (
    ASYMMETRIC_ALGORITHMS,
    MAX_RSA_BITS,
    MAX_RSA_EXPONENT,
    MIN_RSA_BITS,
    key_fits_algorithm,
    same_operation,
)
from sidecar.jose.rfc7638_thumbprint import jwk_thumbprint
from sidecar.jose.rfc8032_ed25519 import is_acceptable_public_key as ed25519_acceptable

PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
MAX_KEYS_PER_SET = 64


class JWKError(SidecarError, ValueError):
    """A JWK or JWK Set could not be used."""

    code = "jwk_invalid"


@dataclass(frozen=True, slots=True)
class PublicJWK:
    kid: str | None
    alg: str | None  # the key's own "alg" restriction, if it declared one
    kty: str
    key: Any  # a cryptography public key object
    thumbprint: str
    #: The key's ``use`` when it came from a SPIFFE bundle (``jwt-svid``, ``wit-svid``).
    use: str | None = None

    def usable_with(self, alg: str) -> bool:
        if self.alg is not None and not same_operation(self.alg, alg):
            return False
        return key_fits_algorithm(self.key, alg)


def check_key_strength(key: Any) -> None:
    """Refuse public keys that are weak or expensive to verify with: RSA outside
    2048..4096 bits or with a public exponent above 2**32, Ed25519 keys of small order or
    non-canonical. EC points off the curve never get here: the import itself refuses them."""
    if isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise JWKError(f"RSA modulus is not {MIN_RSA_BITS} to {MAX_RSA_BITS} bits")
        if key.public_numbers().e > MAX_RSA_EXPONENT:
            raise JWKError("RSA public exponent is larger than 2**32")
    elif isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if not ed25519_acceptable(raw):
            raise JWKError("Ed25519 key is of small order or not canonically encoded")


def import_public_jwk(jwk: Mapping[str, Any]) -> PublicJWK:
    """Import one public JWK; raises JWKError with a short reason."""
    if not isinstance(jwk, Mapping):
        raise JWKError("jwk is not an object")
    if PRIVATE_MEMBERS & jwk.keys():
        raise JWKError("jwk contains private or symmetric key material")
    kty = jwk.get("kty")
    if kty not in ("EC", "RSA", "OKP"):
        raise JWKError(f"unsupported kty {kty!r}")
    alg = jwk.get("alg")
    if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
        raise JWKError(f"unsupported alg {alg!r}")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise JWKError(f"key use {use!r} is not 'sig'")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JWKError("kid is not a string")
    try:
        if kty == "EC":
            key: Any = ECAlgorithm.from_jwk(dict(jwk))
        elif kty == "RSA":
            key = RSAAlgorithm.from_jwk(dict(jwk))
        else:
            key = OKPAlgorithm.from_jwk(dict(jwk))
        thumb = jwk_thumbprint(jwk)
    except Exception as exc:
        raise JWKError(f"invalid {kty} key: {type(exc).__name__}") from None
    check_key_strength(key)
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):  # pragma: no cover
        raise JWKError("jwk contains private key material")
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):  # pragma: no cover
        raise JWKError("jwk contains private key material")
    return PublicJWK(kid=kid, alg=alg, kty=kty, key=key, thumbprint=thumb)


def key_entries(doc: Any) -> list[Any]:
    """The ``keys`` array of a JWK Set, bounded in length."""
    keys = doc.get("keys") if isinstance(doc, Mapping) else None
    if not isinstance(keys, list):
        raise JWKError("JWK Set has no 'keys' array")
    if len(keys) > MAX_KEYS_PER_SET:
        raise JWKError(f"JWK Set has more than {MAX_KEYS_PER_SET} keys")
    return keys


def import_jwks(doc: Mapping[str, Any]) -> list[PublicJWK]:
    """Import the usable signing keys of a JWK Set; keys we cannot use are skipped."""
    out: list[PublicJWK] = []
    for entry in key_entries(doc):
        try:
            out.append(import_public_jwk(entry))
        except JWKError:
            continue  # RFC 7517 §5: ignore keys with unsupported members or values
    return out


def public_jwk_dict(key: Any, *, kid: str | None = None, alg: str | None = None) -> dict[str, str]:
    """Export a public key (or the public half of a private key) as a JWK dict."""
    if hasattr(key, "public_key"):
        key = key.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[key.curve.name]
        size = (key.curve.key_size + 7) // 8
        nums = key.public_numbers()
        out = {
            "kty": "EC",
            "crv": crv,
            "x": b64url_encode(nums.x.to_bytes(size, "big")),
            "y": b64url_encode(nums.y.to_bytes(size, "big")),
        }
    elif isinstance(key, rsa.RSAPublicKey):
        rn = key.public_numbers()
        out = {
            "kty": "RSA",
            "n": b64url_encode(rn.n.to_bytes((rn.n.bit_length() + 7) // 8, "big")),
            "e": b64url_encode(rn.e.to_bytes((rn.e.bit_length() + 7) // 8, "big")),
        }
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        crv = "Ed25519" if isinstance(key, ed25519.Ed25519PublicKey) else "Ed448"
        out = {"kty": "OKP", "crv": crv, "x": b64url_encode(raw)}
    else:
        raise JWKError(f"cannot export {type(key).__name__}")
    if kid is not None:
        out["kid"] = kid
    if alg is not None:
        out["alg"] = alg
    return out


def jwks_json(keys: list[dict[str, str]]) -> str:
    return json.dumps({"keys": keys}, separators=(",", ":"))
