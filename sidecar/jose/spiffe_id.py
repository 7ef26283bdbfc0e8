"""SPIFFE IDs (SPIFFE ID standard §2): ``spiffe://<trust domain>/<path>``, checked strictly.

The trust domain is lower-case letters, digits, ``.``, ``-`` and ``_`` (§2.1); the path is
segments of letters, digits, ``.``, ``-`` and ``_``, none empty, ``.`` or ``..``, with no
trailing slash (§2.2). No port, userinfo, query or fragment (§2.3 and §2.4 forbid them; the
character sets above cannot express them anyway). The whole ID is at most 2048 bytes (§2.3).
"""

from __future__ import annotations

import re

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def valid_trust_domain(name: str) -> bool:
    return len(name) <= MAX_TRUST_DOMAIN_BYTES and _TRUST_DOMAIN.fullmatch(name) is not None


def trust_domain_of(spiffe_id: str) -> str | None:
    """The trust domain of a valid SPIFFE ID, or None if ``spiffe_id`` is not one."""
    if len(spiffe_id) > MAX_ID_BYTES or not spiffe_id.startswith(SCHEME):
        return None
    domain, slash, path = spiffe_id[len(SCHEME) :].partition("/")
    if not valid_trust_domain(domain):
        return None
    if slash:
        for segment in path.split("/"):
            if segment in ("", ".", "..") or _SEGMENT.fullmatch(segment) is None:
                return None
    return domain
