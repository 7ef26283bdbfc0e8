"""JWS algorithms (RFC 7518 §3, RFC 8037 §3.1) and which key each may be used with.

RFC 8725 §3.1: libraries MUST let the application specify the algorithms it accepts; we
accept only asymmetric ones, so an HMAC token "signed" with a public key can never verify.
"""

from __future__ import annotations

from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import Algorithm, get_default_algorithms

#: The only algorithms this package will ever verify. "Ed25519" is RFC 9864's fully-specified
#: name for EdDSA over Ed25519 (current clients send it); "EdDSA" stays for Ed25519 and Ed448.
ASYMMETRIC_ALGORITHMS: Final = frozenset(
    {
        "ES256",
        "ES384",
        "ES512",
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "EdDSA",
        "Ed25519",
    }
)

_IMPLS: Final[dict[str, Algorithm]] = {
    name: impl for name, impl in get_default_algorithms().items() if name in ASYMMETRIC_ALGORITHMS
}
_IMPLS["Ed25519"] = _IMPLS["EdDSA"]  # the same signature; key_fits_algorithm narrows the key

#: Names of one operation: a key or an allowlist naming the first may be used with the second.
_ALSO_NAMED: Final = {"EdDSA": "Ed25519"}


def with_aliases(algorithms: frozenset[str]) -> frozenset[str]:
    """An allowlist with the names it implies: "EdDSA" (any curve) covers "Ed25519" (RFC 9864
    §2.2); the reverse does not hold, since "EdDSA" would also admit Ed448."""
    return algorithms | {_ALSO_NAMED[a] for a in algorithms if a in _ALSO_NAMED}


def same_operation(declared: str, alg: str) -> bool:
    """A JWK whose ``alg`` is ``declared`` may sign with ``alg``: equal, or the two names of
    EdDSA over Ed25519 (the key type is checked separately)."""
    return declared == alg or {declared, alg} == {"EdDSA", "Ed25519"}


_EC_CURVE_FOR_ALG: Final = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
#: ECDSA verified directly, not through pyjwt: its wrapper converted r||s in Python and built a
#: new ECDSA(hash) per call, ~20 µs of a DPoP check. (bytes per integer, scheme) per alg.
_ECDSA: Final = {
    "ES256": (32, ec.ECDSA(hashes.SHA256())),
    "ES384": (48, ec.ECDSA(hashes.SHA384())),
    "ES512": (66, ec.ECDSA(hashes.SHA512())),
}

#: RSA keys below this size are refused (RFC 7518 §3.3 requires 2048 bits).
MIN_RSA_BITS: Final = 2048
#: ...and above this one, with the public exponent below: verification cost grows with both,
#: and a client-chosen key (a DPoP proof's jwk) must not make one request cost milliseconds.
#: Every issuer and client seen uses 65537; any odd exponent up to 2**32 stays within ~2x of it.
MAX_RSA_BITS: Final = 4096
MAX_RSA_EXPONENT: Final = 2**32


def key_fits_algorithm(key: Any, alg: str) -> bool:
    """True when ``key`` is a public key that ``alg`` is defined for."""
    if alg in _EC_CURVE_FOR_ALG:
        return (
            isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _EC_CURVE_FOR_ALG[alg]
        )
    if alg[:2] in ("RS", "PS"):
        return isinstance(key, rsa.RSAPublicKey) and MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    if alg == "Ed25519":
        return isinstance(key, ed25519.Ed25519PublicKey)
    return False


def verify_signature(alg: str, key: Any, signing_input: bytes, signature: bytes) -> bool:
    """Verify one JWS signature; False (never an exception) for any mismatch."""
    impl = _IMPLS.get(alg)
    if impl is None or not key_fits_algorithm(key, alg):
        return False
    if alg in _ECDSA:
        return _verify_ecdsa(alg, key, signing_input, signature)
    try:
        return bool(impl.verify(signing_input, key, signature))
    except Exception:
        return False


def _verify_ecdsa(alg: str, key: Any, signing_input: bytes, signature: bytes) -> bool:
    """JWS ECDSA (RFC 7518 §3.4): the signature is R||S, each exactly the curve's size
    (key_fits_algorithm has matched the curve to ``alg``), re-encoded as DER for OpenSSL."""
    size, scheme = _ECDSA[alg]
    if len(signature) != 2 * size:
        return False
    try:
        key.verify(raw_to_der(signature, size), signing_input, scheme)
    except (InvalidSignature, ValueError):
        return False
    return True


_DER_LENGTH = [bytes((n,)) for n in range(0x80)]


def _der_integer(magnitude: bytes) -> bytes:
    """A non-negative big-endian integer as a DER INTEGER: minimal, with a 0x00 in front when
    the top bit is set (X.690 §8.3)."""
    magnitude = magnitude.lstrip(b"\x00") or b"\x00"
    if magnitude[0] & 0x80:
        magnitude = b"\x00" + magnitude
    return b"\x02" + _DER_LENGTH[len(magnitude)] + magnitude


def raw_to_der(signature: bytes, size: int) -> bytes:
    """JWS R||S (``size`` bytes each) as the DER ``Ecdsa-Sig-Value`` OpenSSL verifies: the
    same bytes as ``encode_dss_signature`` (a test compares them) in half the time, since
    no integer is built. P-521's body can pass 127 bytes: long-form length then."""
    body = _der_integer(signature[:size]) + _der_integer(signature[size:])
    n = len(body)
    return (b"\x30" + _DER_LENGTH[n] if n < 0x80 else b"\x30\x81" + bytes((n,))) + body


def sign(alg: str, private_key: Any, signing_input: bytes) -> bytes:
    """Sign with a JWS algorithm (used by the broker and the egress side, and by tests)."""
    impl = _IMPLS.get(alg)
    if impl is None:
        raise ValueError(f"unsupported algorithm {alg!r}")
    return impl.sign(signing_input, private_key)
