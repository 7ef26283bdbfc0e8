"""Replay stores: a DPoP proof's ``(jkt, jti)`` is accepted once per acceptance window
(RFC 9449 §11.1). Stores never evict a live entry: when full they refuse, and the caller
fails closed (``replay_store_unavailable``)."""

from __future__ import annotations

from collections import deque
from typing import Protocol

from sidecar.errors import ReplayStoreUnavailable


class ReplayStore(Protocol):
    async def check_and_insert(self, key: str, now: float, ttl: float) -> bool:
        """Record ``key`` until ``now + ttl``; True if it was not seen before.

        Raises ReplayStoreUnavailable when the store cannot answer or is full."""
        ...

    def size(self) -> int: ...


class InMemoryReplayStore:
    """Bounded, O(1) amortized insert and expiry.

    Entries expire in insertion order because every caller uses the same ttl (the proof
    window), so a deque of (expiry, key) is sorted and expiry pops from its left end.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._expiry: dict[str, float] = {}
        self._queue: deque[tuple[float, str]] = deque()

    def size(self) -> int:
        return len(self._expiry)

    def _purge(self, now: float) -> None:
        queue, expiry = self._queue, self._expiry
        while queue and queue[0][0] <= now:
            exp, key = queue.popleft()
            if expiry.get(key) == exp:
                del expiry[key]

    def check_and_insert_sync(self, key: str, now: float, ttl: float) -> bool:
        self._purge(now)
        exp = self._expiry.get(key)
        if exp is not None and exp > now:
            return False
        if len(self._expiry) >= self.capacity:
            raise ReplayStoreUnavailable("in-memory replay store is full")
        self._expiry[key] = now + ttl
        self._queue.append((now + ttl, key))
        return True

    async def check_and_insert(self, key: str, now: float, ttl: float) -> bool:
        return self.check_and_insert_sync(key, now, ttl)
