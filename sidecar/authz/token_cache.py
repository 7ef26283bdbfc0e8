"""Cache of verified access tokens: an ES256 verify costs ~75 µs, a dict look-up ~0.1 µs.

Keyed by the token itself, valid until the token's ``exp``, bounded (oldest evicted first:
unlike the replay store, dropping a cache entry is always safe), and emptied whenever the key
store changes so a token signed by a key that was withdrawn is verified again.
"""

from __future__ import annotations

from sidecar.jose.rfc9068_access_token import VerifiedToken


class VerifiedTokenCache:
    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._entries: dict[str, VerifiedToken] = {}
        self._generation = -1

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str, generation: int) -> VerifiedToken | None:
        if generation != self._generation:
            self._entries.clear()
            self._generation = generation
            return None
        return self._entries.get(token)

    def put(self, token: str, verified: VerifiedToken, generation: int) -> None:
        if self.capacity <= 0 or generation != self._generation:
            return
        entries = self._entries
        if len(entries) >= self.capacity:
            del entries[next(iter(entries))]  # dicts keep insertion order: oldest first
        entries[token] = verified

    def discard(self, token: str) -> None:
        self._entries.pop(token, None)
