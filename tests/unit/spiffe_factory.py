"""JWT-SVIDs and SPIFFE bundles for unit tests: a trust domain ``demo.local`` (the factory's
principals live there) whose bundle is installed in a harness's TrustBundles."""

from __future__ import annotations

from typing import Any

from factory import AUDIENCE, FRONTEND, NOW, Harness, ec_key, make_harness

from sidecar.jose.rfc7515_jws import sign_compact
from sidecar.jose.rfc7517_jwk import public_jwk_dict
from sidecar.jose.spiffe_bundle import import_bundle
from sidecar.jose.spiffe_jwt_svid import JWT_SVID_ALGORITHMS

DOMAIN = "demo.local"
OTHER_DOMAIN = "partner.example"
DOMAIN_KEY = ec_key(501)
OTHER_KEY = ec_key(502)
DOMAIN_KID = "demo-jwt-1"
OTHER_KID = "partner-jwt-1"


def bundle(key: Any = DOMAIN_KEY, kid: str = DOMAIN_KID, use: str | None = "jwt-svid") -> Any:
    jwk: dict[str, Any] = public_jwk_dict(key, kid=kid)
    if use is not None:
        jwk["use"] = use
    return {"keys": [jwk], "spiffe_sequence": 1, "spiffe_refresh_hint": 300}


def spiffe_harness(*, with_other: bool = False, **overrides: Any) -> Harness:
    domains = {DOMAIN: JWT_SVID_ALGORITHMS}
    if with_other:
        domains[OTHER_DOMAIN] = JWT_SVID_ALGORITHMS
    h = make_harness(trust_domains=domains, **overrides)
    h.authz.bundles.replace(DOMAIN, import_bundle(bundle()))
    if with_other:
        h.authz.bundles.replace(OTHER_DOMAIN, import_bundle(bundle(OTHER_KEY, OTHER_KID)))
    return h


def svid(
    *,
    sub: str = FRONTEND,
    aud: Any = AUDIENCE,
    key: Any = DOMAIN_KEY,
    kid: str | None = DOMAIN_KID,
    alg: str = "ES256",
    typ: str | None = "JWT",
    drop: tuple[str, ...] = (),
    **extra: Any,
) -> str:
    """A JWT-SVID as SPIRE mints it by default: no ``iss``."""
    claims: dict[str, Any] = {"sub": sub, "aud": aud, "exp": int(NOW + 300), "iat": int(NOW)}
    claims.update(extra)
    for name in drop:
        claims.pop(name, None)
    header: dict[str, Any] = {}
    if kid is not None:
        header["kid"] = kid
    if typ is not None:
        header["typ"] = typ
    return sign_compact(key, alg, claims, header=header)
