"""JWK Thumbprint (RFC 7638) with SHA-256, as used by ``cnf.jkt`` (RFC 9449 §6.1)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from sidecar.jose.b64 import b64url_encode

# RFC 7638 §3.2: only the required members, in lexicographic order (RFC 8037 §2 for OKP).
_REQUIRED = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
    "oct": ("k", "kty"),
}


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """base64url(SHA-256(canonical JSON of the required members)); ValueError if incomplete."""
    members = _REQUIRED.get(jwk.get("kty"))  # type: ignore[arg-type]
    if members is None:
        raise ValueError("unsupported kty")
    canonical = {}
    for name in members:
        value = jwk.get(name)
        if not isinstance(value, str):
            raise ValueError(f"jwk member {name!r} missing or not a string")
        canonical[name] = value
    # RFC 7638 §3.3: no whitespace; members are ASCII so ensure_ascii changes nothing.
    data = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return b64url_encode(hashlib.sha256(data).digest())
