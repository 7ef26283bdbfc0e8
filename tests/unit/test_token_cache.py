"""The verified-token cache drops expired entries as new ones arrive, not only at its cap."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import replace
from types import FrameType
from typing import Any

from factory import NOW, make_harness

from sidecar.authz.decision import Allow
from sidecar.authz.token_cache import VerifiedTokenCache
from sidecar.jose.rfc9068_access_token import VerifiedToken

TOKEN = VerifiedToken(
    issuer="https://i",
    subject="spiffe://x/y",
    audiences=("a",),
    expires_at=NOW,
    issued_at=None,
    jti=None,
    client_id=None,
    jkt=None,
    kid=None,
    alg="ES256",
)


def test_expired_tokens_leave_the_authorizers_cache() -> None:
    h = make_harness()  # leeway 5 s; the cache holds 10,000
    for i in range(5):
        token = h.token(jti=f"short-{i}", now=NOW + i, ttl=10)
        assert isinstance(h.decide(h.dpop_request(token=token, now=NOW + i), NOW + i), Allow)
    long_lived = h.token(jti="long", ttl=300)
    assert isinstance(h.decide(h.dpop_request(token=long_lived), NOW), Allow)
    assert len(h.authz.token_cache) == 6
    # Past exp + leeway of the first three only: the next verified token sweeps them out.
    later = NOW + 2 + 10 + 5
    fresh = h.token(jti="fresh", now=later)
    assert isinstance(h.decide(h.dpop_request(token=fresh, now=later), later), Allow)
    assert len(h.authz.token_cache) == 1 + 2 + 1  # fresh, short-3, short-4, long


def test_sweep_follows_expiry_not_insertion_order() -> None:
    cache = VerifiedTokenCache(100, leeway=1.0)
    cache.get("", 0)  # adopt key generation 0
    lifetimes = {"late": 50.0, "early": 10.0, "middle": 30.0, "earliest": 5.0}
    for name, ttl in lifetimes.items():
        cache.put(name, replace(TOKEN, expires_at=NOW + ttl), 0, NOW)
    cache.put("probe", replace(TOKEN, expires_at=NOW + 100), 0, NOW + 11.5)
    assert {t for t in lifetimes if cache.get(t, 0)} == {"late", "middle"}
    cache.put("probe2", replace(TOKEN, expires_at=NOW + 100), 0, NOW + 60)
    assert len(cache) == 2 and cache.get("probe", 0) and cache.get("probe2", 0)


def test_sweep_bookkeeping_stays_bounded_under_eviction() -> None:
    cache = VerifiedTokenCache(10)
    cache.get("", 0)
    for i in range(1000):  # long-lived tokens, evicted at the cap long before they expire
        cache.put(f"t{i}", replace(TOKEN, expires_at=NOW + 3600), 0, NOW)
    assert len(cache) == 10
    assert len(cache._expiry) <= 2 * cache.capacity
    assert cache.get("t999", 0) is not None and cache.get("t0", 0) is None


def test_threads_and_the_event_loop_share_the_cache_safely() -> None:
    """The `threads` gRPC engine's workers and the HTTP transport on the event loop use one
    cache at once: eviction, sweep and rebuild must not trip over each other (a KeyError or
    "dictionary changed size" would become a spurious internal_error deny)."""
    cache = VerifiedTokenCache(8, leeway=0.0)
    cache.get("", 0)
    errors: list[BaseException] = []
    codes = {f.__code__ for f in (cache.put, cache._sweep, cache.get)}

    def yield_each_line(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            time.sleep(0)
        return yield_each_line

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        return yield_each_line if frame.f_code in codes else None

    def worker(n: int) -> None:
        try:
            for i in range(300):
                # Short-lived and long-lived tokens: sweeps, evictions and rebuilds all happen.
                ttl = 1.0 if i % 2 else 3600.0
                cache.put(
                    f"t{n}-{i}", replace(TOKEN, expires_at=NOW + i * 0.01 + ttl), 0, NOW + i * 0.01
                )
                cache.get(f"t{n}-{i - 1}", 0)
        except BaseException as exc:  # any error is the finding
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threading.settrace(tracer)
    try:
        pool = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        threading.settrace(None)
        sys.setswitchinterval(old)
    assert not errors, errors[:3]
    assert len(cache) <= cache.capacity
