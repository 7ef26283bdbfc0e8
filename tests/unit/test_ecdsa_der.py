"""JWS ECDSA signatures (R||S) become the DER OpenSSL verifies: byte for byte what
cryptography's own encoder gives, for every curve size and every edge of the integers."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.jose.rfc7518_algorithms import raw_to_der

SIZES = (32, 48, 66)  # P-256, P-384, P-521


def halves(size: int) -> st.SearchStrategy[bytes]:
    # Leading zeros, top bit set, all zero, all 0xff: every branch of the minimal encoding.
    edge = st.sampled_from([b"\x00" * size, b"\xff" * size, b"\x80" + b"\x00" * (size - 1)])
    zeros = st.integers(0, size).flatmap(
        lambda z: st.binary(min_size=size - z, max_size=size - z).map(lambda b: b"\x00" * z + b)
    )
    return edge | zeros


@pytest.mark.parametrize("size", SIZES)
@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_same_bytes_as_encode_dss_signature(size: int, data: st.DataObject) -> None:
    r, s = data.draw(halves(size)), data.draw(halves(size))
    expected = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
    assert raw_to_der(r + s, size) == expected
