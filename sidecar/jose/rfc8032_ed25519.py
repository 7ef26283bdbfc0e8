"""Ed25519 public keys that must never be trusted (RFC 8032 §5.1.3 decoding, §5.1.7 note).

A public key of small order (one of the 8 points with [8]P = identity) or a non-canonical
encoding (y >= p, or "-0" for x) lets one signature verify for many messages or keys under
some verifiers. RFC 8032 §5.1.7 verifies with the cofactor-free equation but does not reject
these keys; we do, before the key is ever used. The arithmetic is plain Python: it runs once
per key (JWKS load, or the first proof of a client, whose header is then cached).
"""

from __future__ import annotations

_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)

Point = tuple[int, int]


def _decode(raw: bytes) -> Point | None:
    """The affine point of a 32-byte encoding, or None if it is non-canonical or off-curve."""
    if len(raw) != 32:
        return None
    value = int.from_bytes(raw, "little")
    sign, y = value >> 255, value & ((1 << 255) - 1)
    if y >= _P:
        return None  # non-canonical y
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = (u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P)) % _P  # §5.1.3 step 3
    if (v * x * x - u) % _P:
        x = x * _SQRT_M1 % _P
        if (v * x * x - u) % _P:
            return None  # no square root: not on the curve
    if x == 0 and sign:
        return None  # "-0": a second encoding of x = 0
    if x & 1 != sign:
        x = _P - x
    return x, y


def _has_small_order(point: Point) -> bool:
    """[8]P is the identity: three doublings in projective coordinates (no inversion), with
    the a = -1 twisted Edwards doubling formula, complete for Ed25519 (d is not a square)."""
    x, y, z = point[0], point[1], 1
    for _ in range(3):
        a, b, c = x * x % _P, y * y % _P, 2 * z * z % _P
        e = ((x + y) * (x + y) - a - b) % _P
        g = (b - a) % _P
        f = (g - c) % _P
        h = (-a - b) % _P
        x, y, z = e * f % _P, g * h % _P, f * g % _P
    return x == 0 and y == z


def is_acceptable_public_key(raw: bytes) -> bool:
    """False for an Ed25519 public key that is non-canonical, off-curve or of small order."""
    point = _decode(raw)
    return point is not None and not _has_small_order(point)
