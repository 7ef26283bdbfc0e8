"""Cost of one replay-store check-and-insert, per candidate for the store shared by the
authorizer's worker processes on one host.

    python -m benchmarks.replay_stores [--ops 10000] [--rounds 3] [--json FILE]

Candidates, each atomic across processes (check and insert in one step):

* ``lmdb``: :class:`sidecar.authz.replay_lmdb.LmdbReplayStore` (the one chosen), on /dev/shm.
* ``sqlite-wal``: SQLite in /dev/shm, WAL, ``synchronous=OFF``; one ``BEGIN IMMEDIATE``
  transaction purging expired rows and upserting ``WHERE exp <= now`` (no capacity count).
* ``redis-unix`` / ``redis-tcp``: ``SET key 1 NX PX ttl`` to a local redis-server started
  here, over a unix socket and over loopback TCP (the synchronous client: the cost a worker
  would pay per check without an event-loop hop).

References: ``memory`` (the in-process dict of one worker, not shared) and the asynchronous
:class:`RedisReplayStore` over TCP (the cross-host store). Each run inserts ``ops`` fresh keys
and replays every tenth one; µs per operation is wall time / operations, single process, and
``2 procs`` is the same with two processes inserting concurrently into one store (what two
workers do), total wall time / total operations. The best of ``rounds`` interleaved rounds
is reported (other load on the machine only adds time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidecar.authz.replay import InMemoryReplayStore
from sidecar.authz.replay_lmdb import LmdbReplayStore
from sidecar.local_ports import free_port

TTL = 66.0  # the default proof window: max_age 60 + future_leeway 5 + 1
Check = Callable[[str, float, float], bool]


def _tmpfs() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class SqliteStore:
    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (k TEXT PRIMARY KEY, exp REAL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS seen_exp ON seen (exp)")

    def check_and_insert_sync(self, key: str, now: float, ttl: float) -> bool:
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.execute(
                "DELETE FROM seen WHERE k IN (SELECT k FROM seen WHERE exp <= ? LIMIT 256)",
                (now,),
            )
            cur.execute(
                "INSERT INTO seen VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET exp = excluded.exp "
                "WHERE seen.exp <= ?",
                (key, now + ttl, now),
            )
            fresh = cur.rowcount == 1
        finally:
            cur.execute("COMMIT")
        return fresh


class SyncRedisStore:
    def __init__(self, url: str) -> None:
        import redis

        self.r = redis.Redis.from_url(url)

    def check_and_insert_sync(self, key: str, now: float, ttl: float) -> bool:
        return bool(self.r.set("wis:bench:" + key, b"1", nx=True, px=int(ttl * 1000)))


def _make(name: str, where: dict[str, str]) -> Check:
    if name == "memory":
        return InMemoryReplayStore(10_000_000).check_and_insert_sync
    if name == "lmdb":
        return LmdbReplayStore(where["lmdb"], capacity=10_000_000).check_and_insert_sync
    if name == "sqlite-wal":
        return SqliteStore(where["sqlite"]).check_and_insert_sync
    if name == "redis-unix":
        return SyncRedisStore(f"unix://{where['redis_sock']}").check_and_insert_sync
    if name == "redis-tcp":
        return SyncRedisStore(f"redis://127.0.0.1:{where['redis_port']}/0").check_and_insert_sync
    raise ValueError(name)


def _run(check: Check, ops: int, tag: str) -> float:
    """µs per operation: ``ops`` fresh keys, every tenth one replayed right away."""
    keys = [f"{tag}:{i}" for i in range(ops)]
    now = time.time()
    done = 0
    start = time.perf_counter()
    for i, key in enumerate(keys):
        if not check(key, now, TTL):
            raise AssertionError(f"fresh key {key} refused")
        done += 1
        if i % 10 == 0:
            if check(key, now, TTL):
                raise AssertionError(f"replayed key {key} accepted")
            done += 1
    return (time.perf_counter() - start) / done * 1e6


def _worker(name: str, where: dict[str, str], ops: int, tag: str, out: Any) -> None:
    check = _make(name, where)
    out.put(_run(check, ops, tag))


def _two_processes(name: str, where: dict[str, str], ops: int, round_: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(name, where, ops, f"{name}-r{round_}-p{i}", out))
        for i in (0, 1)
    ]
    start = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - start
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"{name}: a benchmark process failed")
    per_proc = [out.get() for _ in procs]  # each worker's own µs/op, for the sanity check
    assert all(v > 0 for v in per_proc)
    return elapsed / (2 * (ops + ops // 10)) * 1e6


def _redis_async_tcp(port: str, ops: int) -> float:
    from sidecar.authz.replay_redis import RedisReplayStore

    async def main() -> float:
        store = RedisReplayStore(f"redis://127.0.0.1:{port}/0", timeout=1.0)
        now = time.time()
        start = time.perf_counter()
        done = 0
        for i in range(ops):
            assert await store.check_and_insert(f"async:{i}", now, TTL)
            done += 1
        elapsed = time.perf_counter() - start
        await store.close()
        return elapsed / done * 1e6

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3, help="the best round counts")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    redis_bin = shutil.which("redis-server")
    tmp = tempfile.mkdtemp(prefix="wis-replay-bench-", dir=_tmpfs())
    where = {
        "lmdb": os.path.join(tmp, "lmdb"),
        "sqlite": os.path.join(tmp, "replay.sqlite"),
        "redis_sock": os.path.join(tmp, "redis.sock"),
        "redis_port": "0",
    }
    redis_proc = None
    rows: list[dict[str, Any]] = []
    try:
        names = ["memory", "lmdb", "sqlite-wal"]
        if redis_bin:
            where["redis_port"] = str(free_port())
            redis_proc = subprocess.Popen(
                [
                    redis_bin,
                    "--port",
                    where["redis_port"],
                    "--bind",
                    "127.0.0.1",
                    "--unixsocket",
                    where["redis_sock"],
                    "--unixsocketperm",
                    "600",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    tmp,
                ],
                stdout=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while not os.path.exists(where["redis_sock"]) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
            names += ["redis-unix", "redis-tcp"]
        else:
            print("redis-server not found: Redis candidates skipped", file=sys.stderr)
        # Rounds interleave the candidates and the best round counts: on a shared machine the
        # other load only ever adds time. Each store is opened once (LMDB: once per process).
        stores = {name: _make(name, where) for name in names}
        best: dict[str, tuple[float, float | None]] = {}
        for r in range(args.rounds):
            for name in names:
                single = _run(stores[name], args.ops, f"{name}-r{r}")
                shared = None if name == "memory" else _two_processes(name, where, args.ops, r)
                old = best.get(name)
                if old is not None:
                    single = min(single, old[0])
                    shared = None if shared is None or old[1] is None else min(shared, old[1])
                best[name] = (single, shared)
        for name in names:
            rows.append(
                {"store": name, "us_per_op": best[name][0], "us_per_op_2procs": best[name][1]}
            )
        if redis_bin:
            rows.append(
                {
                    "store": "redis-tcp (async RedisReplayStore)",
                    "us_per_op": _redis_async_tcp(where["redis_port"], args.ops),
                    "us_per_op_2procs": None,
                }
            )
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print("| store | µs per check_and_insert | 2 procs, µs per op (wall) |")
    print("|---|---|---|")
    for row in rows:
        two = "—" if row["us_per_op_2procs"] is None else f"{row['us_per_op_2procs']:.1f}"
        print(f"| {row['store']} | {row['us_per_op']:.1f} | {two} |")
    if args.json:
        from benchmarks.common import machine

        args.json.write_text(json.dumps({"machine": machine(), "ops": args.ops, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
