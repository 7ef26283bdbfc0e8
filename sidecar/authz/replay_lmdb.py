"""The replay store shared by the worker processes of one host: an LMDB map on tmpfs.

Chosen by measurement against SQLite (WAL, /dev/shm) and a local Redis on a unix socket
(``benchmarks/replay_stores.py``, table in the README): one LMDB write transaction is a few
microseconds and needs no server process. LMDB serialises write transactions across processes
with its lock file, so the check and the insert are one atomic step for every worker.

Sub-databases: ``seen`` maps a key's hash to its expiry, ``expiry`` orders (expiry, hash)
so each insert first drops a bounded batch of expired entries from its front. Like the
in-memory store it never evicts a live entry: at ``capacity`` live entries (or if the map is
full) it raises ReplayStoreUnavailable and the caller fails closed. ``meta`` holds the
map's epoch (see ``ReplayStore.epoch``).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import lmdb

from sidecar.errors import ReplayStoreUnavailable

_HASH_BYTES = 20  # keys are hashed: fixed-size records, no client text stored
_PURGE_BATCH = 256  # expired entries dropped per insert at most (bounded latency)
_BYTES_PER_ENTRY = 512  # map size per live entry: both B-trees with room for page splits
#: Bytes of the map's file allocated beyond its last used page. Writes go straight into the
#: shared mapping (``writemap``: half the cost of an insert, no write() per commit), and a
#: page of a sparse file that tmpfs cannot back would kill the process with SIGBUS; so the
#: file is allocated ahead of use, and when tmpfs has no room for that the insert fails
#: closed instead. One insert dirties a few pages, several workers insert between two looks
#: of one: 8 MiB is thousands of inserts ahead.
RESERVE_AHEAD = 8 << 20


class LmdbReplayStore:
    def __init__(
        self,
        path: str | Path,
        capacity: int = 100_000,
        *,
        clock: Callable[[], float] = time.time,
        reserve_ahead: int = RESERVE_AHEAD,
    ) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        os.makedirs(path, mode=0o700, exist_ok=True)
        self._map_size = max(capacity * _BYTES_PER_ENTRY, 1 << 24)
        self._reserve_ahead = reserve_ahead
        self._reserved = 0  # bytes of the file known to be allocated
        self._fd = -1
        try:
            self._env = lmdb.open(
                str(path),
                map_size=self._map_size,
                max_dbs=3,
                # The map lives on tmpfs and is rebuilt when the parent starts: durability
                # across a host crash buys nothing, so no fsync on commit.
                sync=False,
                metasync=False,
                readahead=False,
                meminit=False,
                writemap=True,  # safe from SIGBUS only with the file allocated: _make_room
                mode=0o600,
            )
            self._page = int(self._env.stat()["psize"])
            self._fd = os.open(os.path.join(path, "data.mdb"), os.O_RDWR | os.O_CLOEXEC)
            self._make_room()
            self._seen = self._env.open_db(b"seen")
            self._expiry = self._env.open_db(b"expiry")
            self._epoch = self._first_open(clock())
        except lmdb.Error as exc:
            self._close_fd()
            raise ReplayStoreUnavailable(f"lmdb: {type(exc).__name__}") from None
        except ReplayStoreUnavailable:
            self._close_fd()
            raise

    def _make_room(self) -> None:
        """Allocate the file up to ``reserve_ahead`` past its last used page, once half of
        that margin is used; raise ReplayStoreUnavailable (fail closed) if tmpfs is full."""
        end = (int(self._env.info()["last_pgno"]) + 1) * self._page
        if end + self._reserve_ahead // 2 <= self._reserved:
            return
        want = min(end + self._reserve_ahead, self._map_size)
        try:
            os.posix_fallocate(self._fd, 0, want)
        except OSError as exc:
            raise ReplayStoreUnavailable(
                f"lmdb: no room for the shared replay map ({os.strerror(exc.errno or 0)})"
            ) from None
        self._reserved = want

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _first_open(self, now: float) -> float:
        """The map's epoch is when its first user created it: a worker that restarts keeps
        it (the map kept every key), a new parent makes a new map and a new epoch."""
        meta = self._env.open_db(b"meta")
        with self._env.begin(write=True) as txn:
            stored = txn.get(b"epoch", db=meta)
            if stored is None:
                stored = repr(now).encode()
                txn.put(b"epoch", stored, db=meta)
        return float(stored)

    @property
    def epoch(self) -> float:
        return self._epoch

    def size(self) -> int:
        try:
            with self._env.begin() as txn:
                return int(txn.stat(self._seen)["entries"])
        except lmdb.Error:
            return -1

    def check_and_insert_sync(self, key: str, now: float, ttl: float) -> bool:
        digest = hashlib.sha256(key.encode()).digest()[:_HASH_BYTES]
        now_ms = int(now * 1000)
        expires = int((now + ttl) * 1000).to_bytes(8, "big")
        try:
            self._make_room()
            with self._env.begin(write=True) as txn:
                self._purge(txn, now_ms)
                old = txn.get(digest, db=self._seen)
                if old is not None and int.from_bytes(old, "big") > now_ms:
                    return False
                if txn.stat(self._seen)["entries"] >= self.capacity:
                    raise ReplayStoreUnavailable("shared replay store is full")
                txn.put(digest, expires, db=self._seen)
                txn.put(expires + digest, b"", db=self._expiry)
        except lmdb.Error as exc:  # MapFullError among them: fail closed, never allow
            raise ReplayStoreUnavailable(f"lmdb: {type(exc).__name__}") from None
        return True

    def _purge(self, txn: lmdb.Transaction, now_ms: int) -> None:
        cursor = txn.cursor(db=self._expiry)
        if not cursor.first():
            return
        for _ in range(_PURGE_BATCH):
            item = cursor.key()
            if not item or int.from_bytes(item[:8], "big") > now_ms:
                return
            digest = item[8:]
            # A key seen again after expiring has a newer expiry: keep that record.
            if txn.get(digest, db=self._seen) == item[:8]:
                txn.delete(digest, db=self._seen)
            if not cursor.delete():  # moves to the next item; False at the end
                return

    async def check_and_insert(self, key: str, now: float, ttl: float) -> bool:
        return self.check_and_insert_sync(key, now, ttl)

    async def close(self) -> None:
        self._env.close()
        self._close_fd()
