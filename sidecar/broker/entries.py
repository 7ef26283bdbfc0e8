"""The registration entries in force: those of the configuration file (replaced on reload)
followed by those added at run time through the admin socket (``sidecar broker entries``),
which are kept in ``state_dir/entries.json`` (mode 0600, atomic replace) and survive restarts
and reloads. Every change builds and checks a whole new :class:`Registry` first and swaps it in
only when valid, so a request sees the old set or the new one, never a mix."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Collection
from typing import Any

from sidecar.broker.config import check_entry_clusters
from sidecar.broker.registry import Entry, Registry, parse_entry
from sidecar.broker.state_file import read_private, write_atomic
from sidecar.errors import ConfigError

FILE_NAME = "entries.json"
#: How errors name an entry added at run time.
KEY = "runtime entries"


class EntryStore:
    def __init__(
        self, configured: Registry, clusters: Collection[str], state_dir: str | None
    ) -> None:
        self.configured = configured.entries
        self.clusters = frozenset(clusters)
        self.path = os.path.join(state_dir, FILE_NAME) if state_dir is not None else None
        self.added: list[dict[str, Any]] = []  # as given, for the state file
        self.registry = configured
        self._lock = asyncio.Lock()

    def load(self) -> None:
        """Read the entries added at run time (at start; a damaged file stops the start)."""
        if self.path is None:
            return
        data = read_private(self.path, "state_dir")
        if data is None:
            return
        try:
            added = json.loads(data)
            if not isinstance(added, list) or not all(isinstance(a, dict) for a in added):
                raise ValueError
        except ValueError:
            raise ConfigError("state_dir", f"a {FILE_NAME} this broker wrote", self.path) from None
        self.registry = self.build(self.configured, added)
        self.added = added

    def build(self, configured: tuple[Entry, ...], added: list[dict[str, Any]]) -> Registry:
        """The registry of ``configured`` then ``added`` (ConfigError when invalid)."""
        offset = len(configured)
        extra = [parse_entry(raw, f"{KEY}[{i}]", offset + i) for i, raw in enumerate(added)]
        check_entry_clusters(extra, self.clusters, KEY)
        return Registry([*configured, *extra])

    def use_configured(self, configured: Registry, registry: Registry) -> None:
        """Take a reloaded file's entries (``registry`` from :meth:`build`)."""
        self.configured = configured.entries
        self.registry = registry

    async def add(self, raw: dict[str, Any]) -> Entry:
        async with self._lock:
            registry = self.build(self.configured, [*self.added, raw])
            await self._save([*self.added, raw])
            self.added.append(raw)
            self.registry = registry
        return registry.entries[-1]

    async def remove(self, spiffe_id: str) -> int:
        """Remove the run-time entries of ``spiffe_id``; returns how many."""
        async with self._lock:
            kept = [a for a in self.added if a.get("spiffe_id") != spiffe_id]
            removed = len(self.added) - len(kept)
            if removed:
                registry = self.build(self.configured, kept)
                await self._save(kept)
                self.added, self.registry = kept, registry
        return removed

    async def _save(self, added: list[dict[str, Any]]) -> None:
        if self.path is None:
            raise ConfigError("state_dir", "set, to change entries at run time")
        data = json.dumps(added, indent=1).encode() + b"\n"
        await asyncio.to_thread(write_atomic, self.path, data)

    def listing(self) -> list[dict[str, Any]]:
        count = len(self.configured)
        return [
            {
                "index": e.index,
                "source": "config" if e.index < count else "runtime",
                "spiffe_id": e.spiffe_id,
                "selectors": sorted(e.selectors),
                "audiences": list(e.audiences),
                "ttl": e.ttl,
            }
            for e in self.registry.entries
        ]
