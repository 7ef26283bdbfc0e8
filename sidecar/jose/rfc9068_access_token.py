"""JWT access tokens (RFC 9068, RFC 7519) verified per the JWT BCP (RFC 8725).

Checks, in order: compact form and size; ``iss`` is one we trust (exact string match,
RFC 8725 §3.8); ``alg`` is in that issuer's allowlist (§3.1); a key of that issuer signed it;
``typ`` is explicit (RFC 9068 §4: "MUST verify that the typ header value is at+jwt");
claim types; ``exp``/``nbf``/``iat`` against the clock passed in, with leeway; ``aud``
contains ours (RFC 9068 §4: "MUST validate that the aud claim contains a resource indicator
value corresponding to an identifier the resource server expects for itself").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.errors import AuthError, Reason
from sidecar.jose.claim_text import acceptable_text
from sidecar.jose.rfc7515_jws import CompactJWS, JWSFormatError, normalize_typ, parse_compact
from sidecar.jose.rfc7517_jwk import PublicJWK
from sidecar.jose.rfc7518_algorithms import ASYMMETRIC_ALGORITHMS, verify_signature

MAX_CLAIM_STRING = 2048
MAX_AUDIENCES = 32


class KeyLookup(Protocol):
    def keys_for(self, issuer: str, kid: str | None) -> Sequence[PublicJWK]: ...


@dataclass(frozen=True, slots=True)
class IssuerPolicy:
    issuer: str
    algorithms: frozenset[str]
    #: Accepted ``typ`` values, compared case-insensitively without "application/".
    #: Empty means ``typ`` may be absent (e.g. SPIFFE JWT-SVIDs, which use "JWT" or nothing).
    token_types: frozenset[str] = frozenset({"at+jwt"})


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    issuer: str
    subject: str
    audiences: tuple[str, ...]
    expires_at: float
    issued_at: float | None
    jti: str | None
    client_id: str | None
    jkt: str | None  # cnf.jkt: the token is DPoP-bound to this key thumbprint
    kid: str | None
    alg: str


def _str_claim(claims: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise AuthError(Reason.MALFORMED_TOKEN, f"claim {name} is missing")
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_CLAIM_STRING:
        raise AuthError(Reason.MALFORMED_TOKEN, f"claim {name} is not a non-empty string")
    if not acceptable_text(value):
        # These values become HTTP headers for the app (x-workload-id) and log fields.
        raise AuthError(Reason.MALFORMED_TOKEN, f"claim {name} is not printable ASCII")
    return value


def _time_claim(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise AuthError(Reason.MALFORMED_TOKEN, f"claim {name} is missing")
        return None
    # bool is an int subclass in Python; "exp": true must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise AuthError(Reason.MALFORMED_TOKEN, f"claim {name} is not a NumericDate")
    if not -1e12 < value < 1e12:
        raise AuthError(Reason.MALFORMED_TOKEN, f"claim {name} is out of range")
    return float(value)


def _audiences(claims: Mapping[str, Any]) -> tuple[str, ...]:
    aud = claims.get("aud")
    if isinstance(aud, str) and aud:
        return (aud,)
    if (
        isinstance(aud, list)
        and 0 < len(aud) <= MAX_AUDIENCES
        and all(isinstance(a, str) and a for a in aud)
    ):
        return tuple(aud)
    raise AuthError(Reason.MALFORMED_TOKEN, "claim aud is missing or not a string/list of strings")


def check_lifetime_and_audience(
    exp: float,
    nbf: float | None,
    iat: float | None,
    token_auds: tuple[str, ...],
    audiences: frozenset[str],
    now: float,
    leeway: float,
) -> None:
    """RFC 7519 §4.1.3-§4.1.6 against the clock passed in, with leeway."""
    if now >= exp + leeway:
        raise AuthError(Reason.EXPIRED, "token has expired")
    if nbf is not None and now + leeway < nbf:
        raise AuthError(Reason.NOT_YET_VALID, "token is not valid yet (nbf)")
    if iat is not None and now + leeway < iat:
        raise AuthError(Reason.NOT_YET_VALID, "token was issued in the future (iat)")
    if audiences.isdisjoint(token_auds):
        raise AuthError(Reason.WRONG_AUDIENCE, "token audience is not this service")


def verify_access_token(
    token: str,
    *,
    issuers: Mapping[str, IssuerPolicy],
    keys: KeyLookup,
    audiences: frozenset[str],
    now: float,
    leeway: float,
    max_bytes: int,
    other_profile: Callable[[CompactJWS, float], VerifiedToken | None] | None = None,
) -> VerifiedToken:
    """Verify a JWT access token or raise AuthError with the reason code. A token whose
    ``iss`` is absent or not a trusted issuer goes to ``other_profile`` first (the SPIFFE
    trust domains), which verifies it or returns None to let the checks here refuse it."""
    try:
        jws = parse_compact(token, max_bytes=max_bytes)
    except JWSFormatError as exc:
        raise AuthError(Reason.MALFORMED_TOKEN, str(exc)) from None
    header, claims = jws.header, jws.payload
    alg = header["alg"]
    if alg not in ASYMMETRIC_ALGORITHMS:
        # Catches "none" and HMAC before anything else looks at the token (RFC 8725 §2.1).
        raise AuthError(Reason.ALG_NOT_ALLOWED, f"algorithm {alg[:20]!r} is never accepted")
    if other_profile is not None:
        raw_iss = claims.get("iss")
        if not isinstance(raw_iss, str) or raw_iss not in issuers:
            other = other_profile(jws, now)
            if other is not None:
                return other
    iss = _str_claim(claims, "iss", required=True)
    assert iss is not None
    policy = issuers.get(iss)
    if policy is None:
        raise AuthError(Reason.UNTRUSTED_ISSUER, "issuer is not trusted")
    if alg not in policy.algorithms:
        raise AuthError(Reason.ALG_NOT_ALLOWED, f"algorithm {alg} is not allowed for this issuer")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or len(kid) > 256 or not acceptable_text(kid)):
        raise AuthError(Reason.MALFORMED_TOKEN, "kid is not a printable string")
    candidates = [k for k in keys.keys_for(iss, kid) if k.usable_with(alg)]
    if not candidates:
        raise AuthError(Reason.UNKNOWN_KEY, "no key of this issuer matches kid and alg")
    if not any(verify_signature(alg, k.key, jws.signing_input, jws.signature) for k in candidates):
        raise AuthError(Reason.BAD_SIGNATURE, "signature does not verify")

    typ = header.get("typ")
    if typ is not None and not isinstance(typ, str):
        raise AuthError(Reason.WRONG_TYPE, "typ is not a string")
    if policy.token_types and (typ is None or normalize_typ(typ) not in policy.token_types):
        raise AuthError(Reason.WRONG_TYPE, "typ is not an accepted access-token type")

    sub = _str_claim(claims, "sub", required=True)
    assert sub is not None
    exp = _time_claim(claims, "exp", required=True)
    assert exp is not None
    nbf = _time_claim(claims, "nbf", required=False)
    iat = _time_claim(claims, "iat", required=False)
    jti = _str_claim(claims, "jti", required=False)
    client_id = _str_claim(claims, "client_id", required=False)
    token_auds = _audiences(claims)
    jkt = None
    cnf = claims.get("cnf")
    if cnf is not None:
        if not isinstance(cnf, dict):
            raise AuthError(Reason.MALFORMED_TOKEN, "claim cnf is not an object")
        jkt = _str_claim(cnf, "jkt", required=False)
        if jkt is not None and (len(jkt) != 43 or not jkt.isascii()):
            raise AuthError(Reason.MALFORMED_TOKEN, "cnf.jkt is not a SHA-256 thumbprint")

    check_lifetime_and_audience(exp, nbf, iat, token_auds, audiences, now, leeway)
    return VerifiedToken(
        issuer=iss,
        subject=sub,
        audiences=token_auds,
        expires_at=exp,
        issued_at=iat,
        jti=jti,
        client_id=client_id,
        jkt=jkt,
        kid=kid,
        alg=alg,
    )
