"""base64url without padding (RFC 7515 §2, Appendix C)."""

from __future__ import annotations

import base64
import binascii
import re

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_URL_TO_STD = bytes.maketrans(b"-_", b"+/")
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# The last character of an unpadded group of 2 (or 3) characters carries 4 (or 2) unused low
# bits; the canonical spelling has them zero, so it is every 16th (or 4th) alphabet letter.
_CANONICAL_LAST = {2: frozenset(_ALPHABET[::16]), 3: frozenset(_ALPHABET[::4])}
_PADDING = ("", "", "==", "=")


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict decode: the unpadded alphabet only; raises ValueError on anything else."""
    rest = len(text) % 4
    if rest == 1 or not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    # One encoding per value: unused low bits in the last character must be zero, so a
    # signature or claim cannot be re-spelled (RFC 4648 §3.5, canonical encoding).
    if rest and text[-1] not in _CANONICAL_LAST[rest]:
        raise ValueError("non-canonical base64url")
    # The alphabet is checked above, so the decoder sees nothing it would skip.
    return binascii.a2b_base64((text + _PADDING[rest]).encode("ascii").translate(_URL_TO_STD))
