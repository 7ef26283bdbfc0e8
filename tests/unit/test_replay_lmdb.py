"""The workers' shared replay store: once per key across processes, expiry, bounded."""

from __future__ import annotations

import errno
import multiprocessing
import os
from pathlib import Path

import pytest

from sidecar.authz.replay_lmdb import LmdbReplayStore
from sidecar.errors import ReplayStoreUnavailable

TTL = 66.0


def test_a_key_is_accepted_once_until_it_expires(tmp_path: Path) -> None:
    store = LmdbReplayStore(tmp_path / "r", capacity=10)
    assert store.check_and_insert_sync("jkt:jti", 1000.0, TTL)
    assert not store.check_and_insert_sync("jkt:jti", 1000.0 + TTL - 0.01, TTL)
    assert store.check_and_insert_sync("jkt:jti", 1000.0 + TTL, TTL)  # expired: new window
    assert store.size() == 1


def test_full_store_fails_closed_and_expiry_frees_it(tmp_path: Path) -> None:
    store = LmdbReplayStore(tmp_path / "r", capacity=3)
    for i in range(3):
        assert store.check_and_insert_sync(f"k{i}", 1000.0 + i, TTL)
    with pytest.raises(ReplayStoreUnavailable, match="full"):
        store.check_and_insert_sync("k3", 1010.0, TTL)
    assert not store.check_and_insert_sync("k0", 1010.0, TTL)  # live entries never evicted
    # k0 and k1 expire: their room is taken back on the next insert.
    assert store.check_and_insert_sync("k3", 1000.0 + TTL + 1.5, TTL)
    assert store.size() == 2  # k2, k3


def _insert_all(path: str, keys: int, out: multiprocessing.Queue[int]) -> None:
    store = LmdbReplayStore(path, capacity=100_000)
    out.put(sum(store.check_and_insert_sync(f"k{i}", 1000.0, TTL) for i in range(keys)))


def test_two_processes_racing_on_the_same_keys_accept_each_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[int] = ctx.Queue()
    keys = 3000
    procs = [ctx.Process(target=_insert_all, args=(str(tmp_path / "r"), keys, out)) for _ in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    accepted = [out.get(timeout=5) for _ in procs]
    assert sum(accepted) == keys, accepted


def _epoch_of(path: str, out: multiprocessing.Queue[float]) -> None:
    out.put(LmdbReplayStore(path, capacity=10, clock=lambda: 2000.0).epoch)


def test_epoch_is_the_maps_creation_not_a_reopening(tmp_path: Path) -> None:
    # A restarted worker reopens the map that kept every key: no proof predates it.
    store = LmdbReplayStore(tmp_path / "r", capacity=10, clock=lambda: 1000.0)
    assert store.epoch == 1000.0
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[float] = ctx.Queue()
    proc = ctx.Process(target=_epoch_of, args=(str(tmp_path / "r"), out))
    proc.start()
    proc.join(60)
    assert out.get(timeout=5) == 1000.0
    assert LmdbReplayStore(tmp_path / "fresh", capacity=10, clock=lambda: 3000.0).epoch == 3000.0


def _allocated(path: Path) -> int:
    return (path / "data.mdb").stat().st_blocks * 512


def test_the_map_file_is_allocated_ahead_of_every_page_written(tmp_path: Path) -> None:
    # Writes go into a shared mapping: a page tmpfs had not allocated could not be backed
    # (SIGBUS). The file is allocated ahead of the last used page, and grows with it.
    store = LmdbReplayStore(tmp_path / "r", capacity=100_000, reserve_ahead=64 << 10)
    first = _allocated(tmp_path / "r")
    assert first >= 64 << 10
    for i in range(5000):
        assert store.check_and_insert_sync(f"jkt:{i}", 1000.0, TTL)
        if i % 500 == 0:
            used = (store._env.info()["last_pgno"] + 1) * store._page
            # Ahead of use (pages written alone would be exactly the used ones): room is made
            # before each insert for half the margin, and one insert takes a few pages.
            assert _allocated(tmp_path / "r") >= used + (16 << 10)
    assert _allocated(tmp_path / "r") > first  # it grew with the entries
    # Far less than the whole map (51 MB here): allocated as needed, not all at start.
    assert _allocated(tmp_path / "r") < 8 << 20


def test_no_room_on_tmpfs_fails_closed_at_start_and_on_insert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LmdbReplayStore(tmp_path / "r", capacity=100_000, reserve_ahead=64 << 10)

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ReplayStoreUnavailable, match="no room"):
        for i in range(5000):  # until the margin runs out
            store.check_and_insert_sync(f"jkt:{i}", 1000.0, TTL)
    accepted = store.size()
    assert 0 < accepted < 5000
    with pytest.raises(ReplayStoreUnavailable, match="No space left"):
        LmdbReplayStore(tmp_path / "other", capacity=10)
