"""The token the egress side sends, and an UNVERIFIED look inside JWTs.

The sidecar never needs to verify its own access tokens (the receiving side does), but it
reads three claims to behave well: ``exp`` (never send an expired token, even if the issuer's
``expires_in`` was generous), ``aud`` (a file token must cover the audience asked for) and
``cnf.jkt`` (a DPoP-bound token must be bound to *our* key, RFC 9449 §6.1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sidecar.jose.b64 import b64url_decode
from sidecar.jose.rfc7638_thumbprint import jwk_thumbprint


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """An access token and what we know about it. ``expires_at`` and ``issued_at`` are on the
    clock the token source was given (Unix seconds). ``token_type`` is ``DPoP`` (send with a
    proof, RFC 9449 §7.1), ``Bearer`` (RFC 6750), or ``WIT`` (a Workload Identity Token: sent
    in its own header with a proof per request, never in ``Authorization``)."""

    token: str = field(repr=False)
    token_type: str
    expires_at: float
    issued_at: float
    audience: str
    issued_token_type: str | None = None
    claims: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def is_dpop(self) -> bool:
        return self.token_type == "DPoP"

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.issued_at

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value (RFC 9449 §7.1 / RFC 6750 §2.1)."""
        return f"{self.token_type} {self.token}"


def unverified_claims(token: str) -> dict[str, Any] | None:
    """The payload of a compact JWS/JWT without checking anything, or None if ``token`` is not
    one (an opaque token). Never use the result for an authorization decision."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        value = json.loads(b64url_decode(parts[1]))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def unverified_header(token: str) -> dict[str, Any] | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        value = json.loads(b64url_decode(parts[0]))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def numeric_claim(claims: dict[str, Any] | None, name: str) -> float | None:
    value = None if claims is None else claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return None
    return float(value)


def audiences_of(claims: dict[str, Any] | None) -> list[str] | None:
    """``aud`` as a list (RFC 7519 §4.1.3: a string or an array), None if absent/invalid."""
    value = None if claims is None else claims.get("aud")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def bound_jkt(claims: dict[str, Any] | None) -> str | None:
    """``cnf.jkt`` (RFC 9449 §6.1) if present."""
    cnf = None if claims is None else claims.get("cnf")
    jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
    return jkt if isinstance(jkt, str) else None


def confirmed_jwk_thumbprint(claims: dict[str, Any] | None) -> str | None:
    """The RFC 7638 thumbprint of ``cnf.jwk`` (RFC 7800 §3.2; a WIT's key) if present."""
    cnf = None if claims is None else claims.get("cnf")
    jwk = cnf.get("jwk") if isinstance(cnf, dict) else None
    if not isinstance(jwk, dict):
        return None
    try:
        return jwk_thumbprint(jwk)
    except (ValueError, TypeError):
        return None


def has_cnf(claims: dict[str, Any] | None) -> bool:
    return isinstance(claims, dict) and isinstance(claims.get("cnf"), dict)
