"""The in-memory replay store: atomic under concurrency (gRPC worker threads and the event
loop call it at once), sized by memory, and the restart guard it feeds."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest
from factory import NOW, make_harness

from sidecar.authz.config import parse_authz_config
from sidecar.authz.decision import Allow, Deny
from sidecar.authz.replay import DEFAULT_MAX_MEMORY_MIB, ENTRY_BYTES, InMemoryReplayStore
from sidecar.errors import ConfigError, Reason

TTL = 66.0


@pytest.fixture
def heavy_switching() -> Iterator[None]:
    """Switch threads as often as the interpreter allows, and offer the GIL away at every line
    of the store's insert: a check-then-insert that is not one atomic step then lets two
    racers both see "absent" (without the yields it happens a few times in thousands)."""
    code = InMemoryReplayStore.check_and_insert_sync.__code__

    def yield_each_line(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            time.sleep(0)
        return yield_each_line

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        return yield_each_line if frame.f_code is code else None

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threading.settrace(tracer)
    sys.settrace(tracer)
    yield
    sys.settrace(None)
    threading.settrace(None)
    sys.setswitchinterval(old)


def test_concurrent_inserts_of_one_key_accept_it_once(heavy_switching: None) -> None:
    """gRPC worker threads and the event loop (HTTP) race one proof: exactly one wins."""
    threads, rounds = 4, 500
    store = InMemoryReplayStore(epoch=0.0)
    start = threading.Barrier(threads + 1)  # cyclic: every round starts all racers at once
    wins: list[list[str]] = [[] for _ in range(threads + 1)]

    def worker(slot: int) -> None:
        for r in range(rounds):
            start.wait()
            if store.check_and_insert_sync(f"jkt:{r}", NOW, TTL):
                wins[slot].append(f"jkt:{r}")

    async def on_the_loop() -> None:
        for r in range(rounds):
            start.wait()
            if await store.check_and_insert(f"jkt:{r}", NOW, TTL):
                wins[threads].append(f"jkt:{r}")

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    asyncio.run(on_the_loop())
    for t in pool:
        t.join()
    accepted = Counter(k for slot in wins for k in slot)
    twice = sorted(k for k, n in accepted.items() if n > 1)
    assert not twice, f"{len(twice)} of {rounds} keys accepted more than once"
    assert len(accepted) == rounds == store.size()


# -- restart: a store forgets; proofs that may predate it are refused -----------------------


def test_a_proof_used_before_a_restart_is_refused_after_it() -> None:
    clock = [NOW]
    before = make_harness(replay=InMemoryReplayStore(epoch=clock[0] - 3600))
    token = before.token()
    used = before.dpop_request(token=token, now=NOW)
    # Signed 5 s ahead (the most future_leeway allows) and used just before the restart.
    ahead = before.dpop_request(token=token, now=NOW + 5)
    assert isinstance(before.decide(used, NOW), Allow)
    assert isinstance(before.decide(ahead, NOW), Allow)
    assert isinstance(before.decide(used, NOW), Deny)  # the store knows it: replayed

    clock[0] = NOW + 1  # the authorizer restarts: a new process, an empty store
    after = make_harness(issuer=before.issuer, replay=InMemoryReplayStore(epoch=clock[0]))
    for replay in (used, ahead):
        deny = after.decide(replay, clock[0])
        assert isinstance(deny, Deny)
        assert (deny.status, deny.reason) == (503, Reason.PROOF_PREDATES_RESTART)
        assert dict(deny.headers)["retry-after"] == "6"  # epoch + future_leeway + 1 - now
    # A proof signed once the guard has passed is fine, and only once.
    fresh = after.dpop_request(token=token, now=NOW + 7)
    assert isinstance(after.decide(fresh, NOW + 7), Allow)
    again = after.decide(fresh, NOW + 7)
    assert isinstance(again, Deny) and dict(again.headers)["x-authz-reason"] == "replayed"


def test_retry_after_says_when_a_new_proof_passes() -> None:
    h = make_harness(replay=InMemoryReplayStore(epoch=NOW))
    assert h.authz.restart_guard_until() == NOW + 6  # future_leeway 5, whole-second iat
    deny = h.decide(h.dpop_request(now=NOW + 2), NOW + 2)
    assert isinstance(deny, Deny) and dict(deny.headers)["retry-after"] == "4"
    allow = h.decide(h.dpop_request(now=NOW + 6), NOW + 6)
    assert isinstance(allow, Allow)


# -- sized by memory ------------------------------------------------------------------------


@pytest.mark.parametrize("jti_length", [22, 256])
def test_entry_bytes_is_what_an_entry_costs(jti_length: int) -> None:
    """ENTRY_BYTES (which turns authz.replay.max_memory into a capacity) bounds the measured
    cost of an entry, including the dict's growth, and is not a gross overestimate."""
    jkt = "x" * 43
    n = 45_000  # past the dict's growth at 43,691 entries: the costliest moment
    keys = [f"{jkt}:{i:0{jti_length}d}" for i in range(n)]
    store = InMemoryReplayStore(capacity=n, epoch=0.0)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        worst = 0.0
        for i, key in enumerate(keys, 1):
            store.check_and_insert_sync(key, NOW, TTL)
            if i % 1000 == 0 and i >= 10_000:
                worst = max(worst, (tracemalloc.get_traced_memory()[1] - base) / i)
    finally:
        tracemalloc.stop()
    assert 0.75 * ENTRY_BYTES <= worst <= ENTRY_BYTES, worst


def test_max_memory_sets_the_capacity() -> None:
    base = {
        "audience": "spiffe://x/y",
        "issuers": [{"issuer": "https://i", "jwks_file": "/dev/null"}],
        "rules": [{"name": "all", "principals": ["**"], "paths": ["/"]}],
    }
    default = parse_authz_config(base).replay_capacity
    assert default == DEFAULT_MAX_MEMORY_MIB * 1024 * 1024 // ENTRY_BYTES
    assert default / TTL > 5_000  # proofs per second one replica can remember, at 66 s each
    sized = parse_authz_config({**base, "replay": {"max_memory": 256}}).replay_capacity
    assert sized == 256 * 1024 * 1024 // ENTRY_BYTES
    counted = parse_authz_config({**base, "replay": {"capacity": 1000}}).replay_capacity
    assert counted == 1000
    with pytest.raises(ConfigError) as both:
        parse_authz_config({**base, "replay": {"capacity": 1000, "max_memory": 64}})
    assert both.value.key == "authz.replay"
    with pytest.raises(ConfigError) as zero:
        parse_authz_config({**base, "replay": {"max_memory": 0}})
    assert zero.value.key == "authz.replay.max_memory"
