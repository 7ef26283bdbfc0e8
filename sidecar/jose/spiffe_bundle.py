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
