"""The DPoP check's hot path (issue 9): ECDSA verified without pyjwt's per-call wrapper, the
same answers for every input; see also test_jose.py for the algorithm allowlist."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.jose import rfc7518_algorithms
from sidecar.jose.rfc7518_algorithms import sign, verify_signature

CURVES = [
    ("ES256", ec.SECP256R1(), 64),
    ("ES384", ec.SECP384R1(), 96),
    ("ES512", ec.SECP521R1(), 132),
]


@pytest.mark.parametrize(("alg", "curve", "size"), CURVES)
def test_ecdsa_verifies_without_pyjwt(
    alg: str, curve: ec.EllipticCurve, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = ec.generate_private_key(curve)
    signature = sign(alg, key, b"h.p")
    assert len(signature) == size

    def refuse(*args: Any) -> bool:
        raise AssertionError("pyjwt's ECDSA wrapper is on the hot path")

    monkeypatch.setattr(rfc7518_algorithms._IMPLS[alg], "verify", refuse)
    assert verify_signature(alg, key.public_key(), b"h.p", signature) is True
    assert verify_signature(alg, key.public_key(), b"h.q", signature) is False
    other = ec.generate_private_key(curve).public_key()
    assert verify_signature(alg, other, b"h.p", signature) is False


@pytest.mark.parametrize(("alg", "curve", "size"), CURVES)
def test_ecdsa_refuses_malformed_signatures(alg: str, curve: ec.EllipticCurve, size: int) -> None:
    key = ec.generate_private_key(curve)
    pub = key.public_key()
    signature = sign(alg, key, b"h.p")
    half = size // 2
    for bad in (
        b"",
        signature[:-1],  # one byte short
        signature + b"\x00",  # one byte long
        bytes(size),  # r = s = 0
        signature[:half] + bytes(half),  # s = 0
        b"\xff" * size,  # r and s beyond the group order
        signature[half:] + signature[:half],  # r and s swapped
        signature + signature,  # twice the size
    ):
        assert verify_signature(alg, pub, b"h.p", bad) is False
