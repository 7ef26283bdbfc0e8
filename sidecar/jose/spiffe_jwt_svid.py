"""SPIFFE JWT-SVIDs (SPIFFE JWT-SVID standard) verified against per-trust-domain bundles.

A JWT-SVID need not carry ``iss`` (SPIRE omits it by default), so its keys are chosen by the
trust domain of its ``sub`` (§3, §5), and only keys whose bundle ``use`` is ``jwt-svid``
(Trust Domain and Bundle §4.2.2). Profile checks: ``alg`` in the trust domain's allowlist
(§3.1: RS/ES/PS), ``typ`` absent, ``JWT`` or ``JOSE`` (§2.2), ``sub`` a valid SPIFFE ID,
``aud`` and ``exp`` present (§3). A token whose ``kid`` names a key of *another* trusted
domain that does verify it is a cross-domain forgery attempt and gets its own reason.
JWT-SVIDs are bearer tokens (§7): ``cnf`` is not read, so they never pass a DPoP route.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from sidecar.errors import AuthError, Reason
from sidecar.jose.claim_text import acceptable_text
from sidecar.jose.rfc7515_jws import CompactJWS, normalize_typ
from sidecar.jose.rfc7517_jwk import PublicJWK
from sidecar.jose.rfc7518_algorithms import verify_signature
from sidecar.jose.rfc9068_access_token import (
    VerifiedToken,
    _audiences,
    _str_claim,
    _time_claim,
    check_lifetime_and_audience,
)
from sidecar.jose.spiffe_bundle import JWT_SVID
from sidecar.jose.spiffe_id import SCHEME, trust_domain_of

#: JWT-SVID §3.1 algorithms; EdDSA is not among them.
JWT_SVID_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
JWT_SVID_TYPES = frozenset({"jwt", "jose"})


class BundleLookup(Protocol):
    def keys_for_use(self, use: str, trust_domain: str, kid: str | None) -> Sequence[PublicJWK]: ...

    def trust_domains(self) -> Sequence[str]: ...


def verify_jwt_svid(
    jws: CompactJWS,
    *,
    algorithms: Mapping[str, frozenset[str]],
    bundles: BundleLookup,
    audiences: frozenset[str],
    now: float,
    leeway: float,
) -> VerifiedToken | None:
    """Verify ``jws`` as a JWT-SVID, or return None when its ``sub`` is no ``spiffe://`` URI
    (not a JWT-SVID: the caller's other checks apply). ``algorithms`` maps each trusted trust
    domain to its allowed algorithms. Raises AuthError with the reason code."""
    header, claims = jws.header, jws.payload
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.startswith(SCHEME):
        return None
    domain = trust_domain_of(sub)
    if domain is None or not acceptable_text(sub):
        raise AuthError(Reason.MALFORMED_TOKEN, "sub is not a valid SPIFFE ID")
    alg = header["alg"]
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or len(kid) > 256 or not acceptable_text(kid)):
        raise AuthError(Reason.MALFORMED_TOKEN, "kid is not a printable string")
    allowed = algorithms.get(domain)
    if allowed is None:
        _deny_if_other_domain_signed(jws, kid, domain, algorithms, bundles)
        raise AuthError(Reason.UNTRUSTED_ISSUER, "trust domain of sub is not trusted")
    if alg not in allowed:
        raise AuthError(Reason.ALG_NOT_ALLOWED, f"algorithm {alg} is not allowed for this domain")
    candidates = [k for k in bundles.keys_for_use(JWT_SVID, domain, kid) if k.usable_with(alg)]
    if not candidates:
        _deny_if_other_domain_signed(jws, kid, domain, algorithms, bundles)
        raise AuthError(Reason.UNKNOWN_KEY, "no jwt-svid key of this trust domain matches")
    if not any(verify_signature(alg, k.key, jws.signing_input, jws.signature) for k in candidates):
        _deny_if_other_domain_signed(jws, kid, domain, algorithms, bundles)
        raise AuthError(Reason.BAD_SIGNATURE, "signature does not verify")

    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or normalize_typ(typ) not in JWT_SVID_TYPES):
        raise AuthError(Reason.WRONG_TYPE, "typ of a JWT-SVID is absent, JWT or JOSE")
    exp = _time_claim(claims, "exp", required=True)
    assert exp is not None
    token_auds = _audiences(claims)
    nbf = _time_claim(claims, "nbf", required=False)
    iat = _time_claim(claims, "iat", required=False)
    jti = _str_claim(claims, "jti", required=False)
    iss = _str_claim(claims, "iss", required=False)
    check_lifetime_and_audience(exp, nbf, iat, token_auds, audiences, now, leeway)
    return VerifiedToken(
        issuer=iss if iss is not None else SCHEME + domain,
        subject=sub,
        audiences=token_auds,
        expires_at=exp,
        issued_at=iat,
        jti=jti,
        client_id=None,
        jkt=None,
        kid=kid,
        alg=alg,
    )


def _deny_if_other_domain_signed(
    jws: CompactJWS,
    kid: str | None,
    domain: str,
    algorithms: Mapping[str, frozenset[str]],
    bundles: BundleLookup,
) -> None:
    """Raise TRUST_DOMAIN_MISMATCH if a key of another trusted domain with this ``kid`` signed
    the token. Only with a ``kid`` (SPIRE always sets one): without it every key of every
    domain would have to be tried, an amplification a forger could use."""
    if kid is None:
        return
    alg = jws.header["alg"]
    for other in bundles.trust_domains():
        if other == domain or alg not in algorithms.get(other, frozenset()):
            continue
        for key in bundles.keys_for_use(JWT_SVID, other, kid):
            if key.usable_with(alg) and verify_signature(
                alg, key.key, jws.signing_input, jws.signature
            ):
                raise AuthError(
                    Reason.TRUST_DOMAIN_MISMATCH,
                    f"signed by a key of trust domain {other}, not of the sub's",
                )
