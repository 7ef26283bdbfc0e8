"""Stateless DPoP server nonces (RFC 9449 §8).

A nonce is ``base64url(counter || HMAC-SHA256(secret, label || counter)[:16])`` where the
counter is the current time window. Replicas of one service that share the secret accept each
other's nonces without shared state; a nonce is valid in its own window and the next one, so
its lifetime is between one and two windows.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct

from sidecar.jose.b64 import b64url_decode, b64url_encode

_LABEL = b"wis-dpop-nonce\x00"
_MAC_BYTES = 16
NONCE_LENGTH = 32  # base64url of 8 + 16 bytes


class NonceService:
    def __init__(self, secret: bytes, *, window: float = 60.0, context: str = "") -> None:
        if len(secret) < 16:
            raise ValueError("nonce secret must be at least 16 bytes")
        if window <= 0:
            raise ValueError("nonce window must be positive")
        self._key = hmac.new(secret, _LABEL + context.encode(), hashlib.sha256).digest()
        self.window = window
        self._cached: tuple[int, str] = (-1, "")

    def _mac(self, counter_bytes: bytes) -> bytes:
        return hmac.new(self._key, counter_bytes, hashlib.sha256).digest()[:_MAC_BYTES]

    def _counter(self, now: float) -> int:
        return math.floor(now / self.window)

    def issue(self, now: float) -> str:
        counter = self._counter(now)
        if self._cached[0] != counter:  # one HMAC per window, not per response
            raw = struct.pack(">q", counter)
            self._cached = (counter, b64url_encode(raw + self._mac(raw)))
        return self._cached[1]

    def check(self, nonce: str, now: float) -> bool:
        """True if the nonce is ours and from this window or the previous one."""
        if len(nonce) != NONCE_LENGTH:
            return False
        try:
            raw = b64url_decode(nonce)
        except ValueError:
            return False
        counter_bytes, mac = raw[:8], raw[8:]
        if not hmac.compare_digest(mac, self._mac(counter_bytes)):
            return False
        age = self._counter(now) - struct.unpack(">q", counter_bytes)[0]
        return bool(0 <= age <= 1)
