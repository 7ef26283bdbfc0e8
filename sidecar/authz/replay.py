"""Replay stores: a DPoP proof's ``(jkt, jti)`` is accepted once per acceptance window
(RFC 9449 §11.1). Stores never evict a live entry: when full they refuse, and the caller
fails closed (``replay_store_unavailable``).

A store also says since when it remembers (``epoch``): a store that restarted has forgotten
the proofs accepted before, so the authorizer refuses proofs that could have been used before
that instant (see ``Authorizer`` and THREAT_MODEL.md, "Restarts").
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from typing import Protocol

from sidecar.errors import ReplayStoreUnavailable

#: Bytes one live entry of :class:`InMemoryReplayStore` costs (dict slot, 16-byte digest,
#: expiry float, queue slot), at worst while the dict grows: measured with tracemalloc
#: (tests/unit/test_replay_store.py: 120-141 steady, 171 at the resize peak), rounded up.
#: ``authz.replay.max_memory`` becomes a capacity through it.
ENTRY_BYTES = 176

#: ``authz.replay.max_memory`` default, MiB.
DEFAULT_MAX_MEMORY_MIB = 64


def capacity_for(max_memory_mib: float) -> int:
    """Entries that fit in ``max_memory_mib`` MiB."""
    return max(1, int(max_memory_mib * 1024 * 1024) // ENTRY_BYTES)


class ReplayStore(Protocol):
    async def check_and_insert(self, key: str, now: float, ttl: float) -> bool:
        """Record ``key`` until ``now + ttl``; True if it was not seen before. Atomic: of
        concurrent calls with one key, from any thread or task, exactly one gets True.

        Raises ReplayStoreUnavailable when the store cannot answer or is full."""
        ...

    def size(self) -> int: ...

    @property
    def epoch(self) -> float:
        """Since when (the authorizer's clock) this store holds every key inserted into it:
        its start, or the last time it was found to have lost its contents. Read after
        ``check_and_insert`` returns, it covers that insert."""
        ...


class InMemoryReplayStore:
    """Bounded, O(1) amortized insert and expiry; safe to call from any thread.

    Entries expire in insertion order because every caller uses the same ttl (the proof
    window), so a deque of keys is sorted by expiry and expiry pops from its left end. Keys are
    stored as 16-byte digests so an entry costs the same whatever the ``jti`` length.
    """

    def __init__(self, capacity: int | None = None, *, epoch: float | None = None) -> None:
        if capacity is None:
            capacity = capacity_for(DEFAULT_MAX_MEMORY_MIB)
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        # Nothing inserted before this process started is known: that is this store's epoch.
        self._epoch = time.time() if epoch is None else epoch
        self._expiry: dict[bytes, float] = {}
        self._queue: deque[bytes] = deque()
        # The gRPC worker threads and the event loop (HTTP) call in concurrently: look-up and
        # insert must be one step. Uncontended, a lock costs well under a microsecond.
        self._lock = threading.Lock()

    @property
    def epoch(self) -> float:
        return self._epoch

    def size(self) -> int:
        return len(self._expiry)

    def _purge(self, now: float) -> None:
        queue, expiry = self._queue, self._expiry
        while queue and expiry[queue[0]] <= now:
            del expiry[queue.popleft()]

    def check_and_insert_sync(self, key: str, now: float, ttl: float) -> bool:
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        with self._lock:
            self._purge(now)
            # After the purge every entry left is live: a key that is present is a replay.
            if digest in self._expiry:
                return False
            if len(self._expiry) >= self.capacity:
                raise ReplayStoreUnavailable("in-memory replay store is full")
            self._expiry[digest] = now + ttl
            self._queue.append(digest)
            return True

    async def check_and_insert(self, key: str, now: float, ttl: float) -> bool:
        return self.check_and_insert_sync(key, now, ttl)
