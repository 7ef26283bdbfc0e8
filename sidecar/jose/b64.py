"""base64url without padding (RFC 7515 §2, Appendix C)."""

from __future__ import annotations

import base64
import binascii
import re

_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict decode: the unpadded alphabet only; raises ValueError on anything else."""
    if not _B64URL.match(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - regex filters first
        raise ValueError("not base64url") from exc
    # One encoding per value: unused low bits in the last character must be zero, so a
    # signature or claim cannot be re-spelled (RFC 4648 §3.5, canonical encoding).
    if len(text) % 4 and b64url_encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data
