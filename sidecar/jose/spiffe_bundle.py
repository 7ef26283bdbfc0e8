"""SPIFFE bundles (SPIFFE Trust Domain and Bundle §4): a JWK Set whose keys say what they are
for in ``use`` — ``jwt-svid``, ``wit-svid`` or ``x509-svid``.

Only the JWT uses are imported, each key tagged with its ``use`` so a verifier picks keys for
the token type in hand and no other. A key without ``use``, or with any other value, is
ignored (§4.2.2 makes ``use`` required in a bundle; guessing its purpose would let a key meant
for one token type verify another).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sidecar.jose.rfc7517_jwk import JWKError, PublicJWK, import_public_jwk, key_entries

JWT_SVID = "jwt-svid"
WIT_SVID = "wit-svid"
JWT_USES = frozenset({JWT_SVID, WIT_SVID})
#: A day: a longer hint would leave a rotated-out key trusted for too long anyway.
MAX_REFRESH_HINT = 86400


def import_bundle(doc: Any) -> list[PublicJWK]:
    """The ``jwt-svid`` and ``wit-svid`` keys of a SPIFFE bundle, each with its ``use``."""
    out: list[PublicJWK] = []
    for entry in key_entries(doc):
        if not isinstance(entry, Mapping) or entry.get("use") not in JWT_USES:
            continue
        jwk = {k: v for k, v in entry.items() if k != "use"}
        try:
            key = import_public_jwk(jwk)
        except JWKError:
            continue  # RFC 7517 §5: skip keys we cannot use
        out.append(dataclasses.replace(key, use=entry["use"]))
    return out


def refresh_hint(doc: Any) -> float | None:
    """``spiffe_refresh_hint`` (Trust Domain and Bundle §4.1.2): how often, in seconds, the
    bundle's publisher wants consumers to check for a new one; None if absent or not a
    positive integer."""
    value = doc.get("spiffe_refresh_hint") if isinstance(doc, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return float(min(value, MAX_REFRESH_HINT))
