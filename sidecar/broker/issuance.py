"""Building and signing access tokens (RFC 9068 JWT profile, DPoP-bound per RFC 9449 §6).

Pure apart from the randomness of ``jti``: the signing key and the clock are passed in.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.broker.keys import SigningKey
from sidecar.jose.b64 import b64url_encode
from sidecar.jose.rfc7518_algorithms import sign


@dataclass(frozen=True, slots=True)
class MintedToken:
    token: str
    jti: str
    kid: str
    iat: int
    exp: int

    @property
    def expires_in(self) -> int:
        return self.exp - self.iat


def token_claims(
    *,
    issuer: str,
    subject: str,
    audiences: Sequence[str],
    jkt: str,
    iat: int,
    exp: int,
    jti: str,
) -> dict[str, Any]:
    """RFC 9068 §2.2 claims. ``aud`` is a string for one audience, a list for several
    (RFC 7519 §4.1.3); ``client_id`` is the workload itself: it is the OAuth client."""
    return {
        "iss": issuer,
        "sub": subject,
        "aud": audiences[0] if len(audiences) == 1 else list(audiences),
        "iat": iat,
        "nbf": iat,
        "exp": exp,
        "jti": jti,
        "client_id": subject,
        # RFC 9449 §6.1: the SHA-256 JWK thumbprint of the proof key the token is bound to.
        "cnf": {"jkt": jkt},
    }


def mint(
    key: SigningKey,
    *,
    issuer: str,
    subject: str,
    audiences: Sequence[str],
    jkt: str,
    now: float,
    ttl: float,
    not_after: float | None = None,
) -> MintedToken:
    """Sign an access token valid from ``now`` for ``ttl`` seconds, and never past
    ``not_after`` (e.g. the expiry of the credential it was exchanged for)."""
    iat = int(now)
    exp = int(now + ttl)
    if not_after is not None:
        exp = min(exp, int(not_after))
    jti = secrets.token_urlsafe(16)  # 128 random bits (RFC 7519 §4.1.7: unique)
    claims = token_claims(
        issuer=issuer, subject=subject, audiences=audiences, jkt=jkt, iat=iat, exp=exp, jti=jti
    )
    payload64 = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{key.header64}.{payload64}"
    signature = sign(key.alg, key.private_key, signing_input.encode("ascii"))
    return MintedToken(
        token=f"{signing_input}.{b64url_encode(signature)}",
        jti=jti,
        kid=key.kid,
        iat=iat,
        exp=exp,
    )
