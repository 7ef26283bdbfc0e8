"""Bearer allows remembered per exact request, so that a repeated cached-bearer check skips the
path canonicalisation, route and rule matching and the building of the identity headers.

Only what cannot change between two identical requests is cached: a bearer allow on a route
without nonces (a nonce answer depends on the time). The key is everything of the request the
core reads for such a check: the raw ``Authorization`` value, the method and the raw path (with
its query); a request carrying its own ``x-workload-*`` headers (which the allow strips) or
longer than ``core.DECISION_KEY_MAX`` is always decided. An
entry is used only while the world it was decided in holds: the same policy and settings
objects (a reload replaces them), the same key-set generation (a rotation clears the verified
tokens too), before the token's ``exp`` + leeway, and the subject and token id still not revoked
(checked on every hit, two set look-ups). Anything else is decided by the core again.
Bounded: the oldest entry goes first (dropping an entry is always safe).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class Cached(Generic[T]):
    """A decision and the world it was decided in."""

    __slots__ = ("generation", "jti", "policy", "settings", "subject", "until", "value")

    def __init__(
        self,
        value: T,
        *,
        policy: object,
        settings: object,
        generation: int,
        until: float,
        subject: str,
        jti: str | None,
    ) -> None:
        self.value = value
        self.policy = policy
        self.settings = settings
        self.generation = generation
        self.until = until
        self.subject = subject
        self.jti = jti


class DecisionCache(Generic[T]):
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: dict[Hashable, Cached[T]] = {}
        # Puts (misses only) take turns: the threads engine's workers and the event loop
        # (HTTP) share the cache. A get is one dict look-up and needs no lock.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self, key: Hashable, *, policy: object, settings: object, generation: int, now: float
    ) -> Cached[T] | None:
        """The entry for ``key`` if it was decided in this world and is not expired; the
        caller still checks revocation of ``entry.subject`` / ``entry.jti``."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if (
            entry.policy is not policy
            or entry.settings is not settings
            or entry.generation != generation
            or now >= entry.until
        ):
            return None  # left in place (only put mutates): a stale entry never answers
        return entry

    def put(self, key: Hashable, entry: Cached[T]) -> None:
        if self.capacity <= 0:
            return
        entries = self._entries
        with self._lock:
            if key not in entries and len(entries) >= self.capacity:
                del entries[next(iter(entries))]  # dicts keep insertion order: oldest first
            entries[key] = entry
