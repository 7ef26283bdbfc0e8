"""base64url (RFC 7515 §2): exactly one accepted spelling per value, nothing else accepted."""

from __future__ import annotations

import base64
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.jose.b64 import b64url_decode, b64url_encode

URL_ALPHABET = string.ascii_letters + string.digits + "-_"


def reference_decode(text: str) -> bytes | None:
    """The rule spelled out slowly: unpadded alphabet only, and re-encoding gives the text."""
    if any(c not in URL_ALPHABET for c in text) or len(text) % 4 == 1:
        return None
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return data if b64url_encode(data) == text else None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=100))
def test_round_trip(data: bytes) -> None:
    assert b64url_decode(b64url_encode(data)) == data


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=URL_ALPHABET + "=+/ \n.", max_size=12))
def test_accepts_exactly_the_canonical_spellings(text: str) -> None:
    expected = reference_decode(text)
    try:
        got: bytes | None = b64url_decode(text)
    except ValueError:
        got = None
    assert got == expected


@pytest.mark.parametrize(
    "text",
    [
        "QUI\n",  # a trailing newline (a "$" anchor would let it through)
        "QUI=",  # padding
        "QR",  # unused bits set: "QQ" is the spelling of b"A"
        "QUJ",  # unused bits set: "QUI" is the spelling of b"AB"
        "Q",  # no whole byte
        "QU+/",  # the standard alphabet
    ],
)
def test_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(text)
