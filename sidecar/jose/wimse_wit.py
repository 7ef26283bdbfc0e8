"""WIMSE Workload Identity Tokens (draft-ietf-wimse-workload-creds-02 §3) and the stricter
SPIFFE WIT-SVID profile (SPIFFE standards, WIT-SVID), verified and issued.

A WIT says "this key belongs to this workload": ``sub`` is a workload identifier URI and
``cnf.jwk`` the workload's public key. It is never a bearer credential: every request also
carries a proof (a WPT, ``wimse_wpt``) signed by that key.

Keys are chosen by the trust domain of ``sub`` (its authority) from configuration, never from a
URL found in the token (workload-creds §3.1, "trust domain"): :class:`WitKeys` is that lookup.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from sidecar.errors import AuthError, Reason
from sidecar.jose.b64 import b64url_encode
from sidecar.jose.claim_text import acceptable_text
from sidecar.jose.rfc7515_jws import JWSFormatError, normalize_typ, parse_compact, sign_compact
from sidecar.jose.rfc7517_jwk import JWKError, PublicJWK, import_public_jwk, public_jwk_dict
from sidecar.jose.rfc7518_algorithms import ASYMMETRIC_ALGORITHMS, verify_signature

WIT_TYP = "wit+jwt"
#: The header carrying a WIT (workload-creds §4.1).
WIT_HEADER = "workload-identity-token"
#: The RFC 8693 ``requested_token_type`` that asks an issuer for a WIT instead of an access
#: token. No URI is registered for WITs (workload-creds-02); this one follows the RFC 8693 §3
#: pattern and is the sidecar's own convention (broker and identity client share it).
WIT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:wit"
MAX_SUB = 2048
MAX_KID = 256
#: RFC 9864 names Ed25519 signatures "Ed25519" and deprecates "EdDSA"; both are accepted.
_ALG_ALIASES = {"Ed25519": "EdDSA"}
#: Every algorithm a WIT or its ``cnf.jwk`` may name (asymmetric only: RFC 8725 §3.1).
WIT_ALGORITHMS = ASYMMETRIC_ALGORITHMS | frozenset(_ALG_ALIASES)
#: WIT-SVID: RS/ES/PS only, no EdDSA (SPIFFE WIT-SVID, "JOSE Header" and "cnf").
SVID_ALGORITHMS = frozenset(a for a in ASYMMETRIC_ALGORITHMS if a[:2] in ("RS", "ES", "PS"))
#: WIT-SVID: no header parameters besides these.
_SVID_HEADER = frozenset({"alg", "kid", "typ"})
_WORKLOAD_SCHEMES = ("spiffe", "wimse")


def jws_algorithm(alg: str) -> str:
    """The algorithm implementation name for a JWS ``alg`` (``Ed25519`` is ``EdDSA``)."""
    return _ALG_ALIASES.get(alg, alg)


def token_hash(value: str) -> str:
    """base64url(SHA-256(ASCII value)): ``wth``, ``ath``, ``tth`` and ``oth`` values
    (draft-ietf-wimse-wpt-01 §3)."""
    return b64url_encode(hashlib.sha256(value.encode("ascii", "replace")).digest())


class WitKeys(Protocol):
    """The WIT signing keys of one trust domain (SPIFFE bundle keys with ``use: wit-svid``)."""

    def wit_keys(self, trust_domain: str, kid: str | None) -> Sequence[PublicJWK]: ...


@dataclass(frozen=True, slots=True)
class WitPolicy:
    algorithms: frozenset[str] = WIT_ALGORITHMS
    #: The SPIFFE WIT-SVID profile: ``kid`` required, no EdDSA, no ``aud``, no other header
    #: parameters.
    svid: bool = False
    leeway: float = 5.0
    max_bytes: int = 8192


@dataclass(frozen=True, slots=True)
class VerifiedWIT:
    subject: str
    trust_domain: str
    issuer: str | None
    kid: str | None
    jti: str | None
    expires_at: float
    key: PublicJWK  # cnf.jwk: the key every WPT must be signed with
    key_alg: str  # cnf.jwk.alg: the algorithm every WPT must use
    wth: str  # hash of the WIT as sent, which a WPT's wth must equal


def workload_trust_domain(sub: str) -> str:
    """The trust domain (authority) of a workload identifier URI; ValueError if ``sub`` is not
    one: ``spiffe://`` or ``wimse://`` with a host and no query, fragment, userinfo or port
    (workload-creds §3.1; SPIFFE-ID §2)."""
    if len(sub) > MAX_SUB or not acceptable_text(sub) or " " in sub:
        raise ValueError("not a printable URI")
    parts = urlsplit(sub)
    if parts.scheme not in _WORKLOAD_SCHEMES:
        raise ValueError("scheme is not spiffe or wimse")
    if "?" in sub or "#" in sub:
        raise ValueError("a workload identifier has no query or fragment")
    if "@" in parts.netloc or ":" in parts.netloc or not parts.netloc:
        raise ValueError("a workload identifier has a plain host: no userinfo, no port")
    return parts.netloc


def _numeric(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and value == value


def verify_wit(token: str, *, keys: WitKeys, now: float, policy: WitPolicy) -> VerifiedWIT:
    """Verify a WIT; raise AuthError with the precise reason. Cheap checks first, the
    signature last."""
    try:
        jws = parse_compact(token, max_bytes=policy.max_bytes)
    except JWSFormatError as exc:
        raise AuthError(Reason.MALFORMED_TOKEN, f"WIT: {exc}") from None
    header, claims = jws.header, jws.payload
    typ = header.get("typ")
    if not isinstance(typ, str) or normalize_typ(typ) != WIT_TYP:
        raise AuthError(Reason.WRONG_TYPE, "WIT typ is not wit+jwt")
    alg = header["alg"]
    allowed = policy.algorithms & SVID_ALGORITHMS if policy.svid else policy.algorithms
    if alg not in allowed:
        raise AuthError(Reason.ALG_NOT_ALLOWED, "WIT alg is not allowed")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID):
        raise AuthError(Reason.MALFORMED_TOKEN, "WIT kid is not a string")
    if policy.svid:
        if kid is None:
            raise AuthError(Reason.MALFORMED_TOKEN, "WIT-SVID has no kid")
        if set(header) - _SVID_HEADER:
            raise AuthError(Reason.MALFORMED_TOKEN, "WIT-SVID has extra header parameters")
        if "aud" in claims:
            raise AuthError(Reason.WRONG_AUDIENCE, "WIT-SVID must not carry aud")
    sub = claims.get("sub")
    try:
        trust_domain = workload_trust_domain(sub) if isinstance(sub, str) else ""
    except ValueError as exc:
        raise AuthError(Reason.MALFORMED_TOKEN, f"WIT sub: {exc}") from None
    if not trust_domain:
        raise AuthError(Reason.MALFORMED_TOKEN, "WIT has no sub")
    assert isinstance(sub, str)
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or not _numeric(exp):
        raise AuthError(Reason.MALFORMED_TOKEN, "WIT has no exp")
    if now >= exp + policy.leeway:
        raise AuthError(Reason.EXPIRED, "WIT has expired")
    nbf = claims.get("nbf")
    if nbf is not None and (not _numeric(nbf) or nbf > now + policy.leeway):
        raise AuthError(Reason.NOT_YET_VALID, "WIT is not yet valid")
    iss, jti = claims.get("iss"), claims.get("jti")
    for name, value in (("iss", iss), ("jti", jti)):
        if value is not None and (not isinstance(value, str) or not acceptable_text(value)):
            raise AuthError(Reason.MALFORMED_TOKEN, f"WIT {name} is not printable text")
    key, key_alg = _confirmation_key(claims.get("cnf"), policy, allowed)
    candidates = keys.wit_keys(trust_domain, kid)
    if not candidates:
        raise AuthError(Reason.UNKNOWN_KEY, "no WIT key for this trust domain and kid")
    impl_alg = jws_algorithm(alg)
    usable = [k for k in candidates if k.usable_with(alg) or k.usable_with(impl_alg)]
    if not usable:
        raise AuthError(Reason.UNKNOWN_KEY, "no WIT key of this trust domain fits the alg")
    if not any(verify_signature(impl_alg, k.key, jws.signing_input, jws.signature) for k in usable):
        raise AuthError(Reason.BAD_SIGNATURE, "WIT signature does not verify")
    return VerifiedWIT(
        subject=sub,
        trust_domain=trust_domain,
        issuer=iss,
        kid=kid,
        jti=jti,
        expires_at=float(exp),
        key=key,
        key_alg=key_alg,
        wth=token_hash(token),
    )


def _confirmation_key(
    cnf: Any, policy: WitPolicy, allowed: frozenset[str]
) -> tuple[PublicJWK, str]:
    """``cnf.jwk`` (RFC 7800 §3.2) with its REQUIRED ``alg`` (workload-creds §3.1)."""
    jwk = cnf.get("jwk") if isinstance(cnf, dict) else None
    if not isinstance(jwk, dict):
        raise AuthError(Reason.MALFORMED_TOKEN, "WIT has no cnf.jwk")
    key_alg = jwk.get("alg")
    if not isinstance(key_alg, str):
        raise AuthError(Reason.MALFORMED_TOKEN, "WIT cnf.jwk has no alg")
    if key_alg not in allowed:
        raise AuthError(Reason.ALG_NOT_ALLOWED, "WIT cnf.jwk alg is not allowed")
    # The import knows "EdDSA", not its RFC 9864 alias: check the alias against the key here.
    try:
        key = import_public_jwk({**jwk, "alg": jws_algorithm(key_alg)})
    except JWKError as exc:
        raise AuthError(Reason.MALFORMED_TOKEN, f"WIT cnf.jwk: {exc}") from None
    if not key.usable_with(jws_algorithm(key_alg)):
        raise AuthError(Reason.MALFORMED_TOKEN, "WIT cnf.jwk does not fit its alg")
    return key, key_alg


def issue_wit(
    signing_key: Any,
    *,
    alg: str,
    kid: str,
    subject: str,
    workload_jwk: dict[str, Any],
    now: float,
    lifetime: float,
    issuer: str | None = None,
) -> str:
    """A WIT in the WIT-SVID profile: ``kid``, ``typ``, no ``aud``, ``cnf.jwk`` with ``alg``."""
    if "alg" not in workload_jwk:
        raise ValueError("the workload key needs an alg (workload-creds §3.1)")
    workload_trust_domain(subject)
    claims: dict[str, Any] = {
        "sub": subject,
        "iat": int(now),
        "exp": int(now + lifetime),
        "jti": secrets.token_urlsafe(16),
        "cnf": {"jwk": workload_jwk},
    }
    if issuer is not None:
        claims["iss"] = issuer
    return sign_compact(signing_key, alg, claims, header={"kid": kid, "typ": WIT_TYP})


def workload_public_jwk(private_key: Any, alg: str) -> dict[str, str]:
    """The ``cnf.jwk`` for a workload key: its public JWK with the REQUIRED ``alg``."""
    return public_jwk_dict(private_key, alg=alg)
