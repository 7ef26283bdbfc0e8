"""The token source's I/O half with a scripted attestor and a fake clock (no sockets): prefetch
and readiness, single flight, never waiting while a usable token is cached, never handing out
an unusable one, and a bounded number of issuer calls while it is down."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sidecar.identity.errors import IdentityCode, IdentityError, NoValidToken
from sidecar.identity.metrics import IdentityMetrics
from sidecar.identity.schedule import RefreshPolicy
from sidecar.identity.source import TokenSource
from sidecar.identity.token import IssuedToken

NOW = 1_700_000_000.0
A = "spiffe://demo.local/ns/shop/sa/orders"
B = "spiffe://demo.local/ns/shop/sa/payments"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class ScriptedAttestor:
    """fetch() waits on ``gate`` (if set), then returns a token or raises ``error``."""

    kind = "scripted"
    max_refresh_interval: float | None = None

    def __init__(self, clock: Clock, ttl: float = 60.0) -> None:
        self.clock = clock
        self.ttl = ttl
        self.calls: list[str] = []
        self.error: IdentityError | None = None
        self.gate: asyncio.Event | None = None
        self.closed = False

    async def fetch(self, audience: str) -> IssuedToken:
        self.calls.append(audience)
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        now = self.clock()
        return IssuedToken(
            f"tok-{len(self.calls)}",
            "DPoP",
            now + self.ttl,
            now,
            audience,
            claims={"sub": "spiffe://demo.local/ns/shop/sa/frontend", "aud": audience},
        )

    async def close(self) -> None:
        self.closed = True


POLICY = RefreshPolicy(backoff_initial=30, backoff_max=60, request_wait=0.5, demand_interval=1)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def make(
    audiences: list[str], *, ttl: float = 60.0, policy: RefreshPolicy = POLICY
) -> tuple[TokenSource, ScriptedAttestor, Clock, CollectorRegistry]:
    clock = Clock()
    attestor = ScriptedAttestor(clock, ttl)
    registry = CollectorRegistry()
    source = TokenSource(
        attestor,
        policy,
        audiences,
        metrics=IdentityMetrics(registry),
        clock=clock,
        draw=lambda: 0.5,
    )
    return source, attestor, clock, registry


def test_prefetch_and_readiness() -> None:
    async def body() -> None:
        source, attestor, _, registry = make([A, B])
        attestor.gate = asyncio.Event()
        async with source:
            await settle()
            ready, why = source.readiness()
            assert not ready and A in why and B in why
            attestor.gate.set()
            await settle()
            assert source.readiness() == (True, "ready")
            assert sorted(attestor.calls) == [A, B]
            text = generate_latest(registry).decode()
            assert f'sidecar_identity_token_expiry_seconds{{audience="{A}"}} 60.0' in text
            assert f'sidecar_identity_token_usable{{audience="{A}"}} 1.0' in text
            assert (
                f'sidecar_identity_token_fetches_total{{audience="{A}",result="ok",'
                'trigger="refresh"}' in text
            )
        assert attestor.closed

    run(body)


def test_single_flight_on_first_use() -> None:
    async def body() -> None:
        source, attestor, _, _ = make([])
        attestor.gate = asyncio.Event()
        async with source:
            waiters = [asyncio.create_task(source.get(A)) for _ in range(50)]
            await settle()
            attestor.gate.set()
            tokens = await asyncio.gather(*waiters)
            assert {t.token for t in tokens} == {"tok-1"}
            assert attestor.calls == [A], "one issuer request for 50 waiting requests"

    run(body)


def test_a_request_never_waits_while_a_usable_token_is_cached() -> None:
    async def body() -> None:
        source, attestor, clock, _ = make([A], ttl=60)
        async with source:
            await settle()
            first = source.current(A)
            assert first is not None
            # Refresh time comes; the issuer hangs.
            attestor.gate = asyncio.Event()
            clock.now += 31
            source._slots[A].wake.set()
            await settle()
            assert len(attestor.calls) == 2, "the refresher is fetching"
            assert source.current(A) is first
            assert await asyncio.wait_for(source.get(A), 0.01) is first
            attestor.gate.set()
            await settle()
            second = source.current(A)
            assert second is not None and second.token == "tok-2"

    run(body)


def test_an_expired_token_is_never_handed_out() -> None:
    async def body() -> None:
        source, attestor, clock, _ = make([A], ttl=20)
        async with source:
            await settle()
            assert source.current(A) is not None
            attestor.error = IdentityError(IdentityCode.UNAVAILABLE, "connection refused")
            clock.now += 15  # margin: min(5, 0.25 * 20) = 5 s, so unusable from +15
            assert source.current(A) is None
            with pytest.raises(NoValidToken) as info:
                await source.get(A)
            err = info.value
            assert err.code == "no_valid_token" and err.audience == A
            assert "unavailable: connection refused" in err.detail
            assert "tok-" not in err.detail

    run(body)


def test_issuer_outage_costs_a_bounded_number_of_fetches() -> None:
    async def body() -> None:
        source, attestor, clock, registry = make([A], ttl=20)
        async with source:
            await settle()
            attestor.error = IdentityError(IdentityCode.UNAVAILABLE, "connection refused")
            clock.now += 16
            calls_before = len(attestor.calls)
            for _ in range(5):  # 5 simulated seconds of heavy traffic
                results = await asyncio.gather(
                    *(source.get(A) for _ in range(100)), return_exceptions=True
                )
                assert all(isinstance(r, NoValidToken) for r in results)
                clock.now += 1.0
            # One on-demand fetch, then the backoff (15 s with this draw) holds back every
            # other, whatever the request rate: demand_interval (1 s) alone would allow 5.
            assert len(attestor.calls) - calls_before == 1
            # The issuer is back: the first request once the backoff has run out succeeds.
            attestor.error = None
            clock.now = source._slots[A].state.next_attempt_at
            tok = await source.get(A)
            assert tok.expires_at > clock.now
            text = generate_latest(registry).decode()
            assert "sidecar_identity_refresh_failures_total" in text
            assert 'code="unavailable"' in text

    run(body)


def test_a_hanging_issuer_does_not_hold_requests_longer_than_request_wait() -> None:
    async def body() -> None:
        source, attestor, _, _ = make([], policy=RefreshPolicy(request_wait=0.05))
        attestor.gate = asyncio.Event()  # never set
        async with source:
            with pytest.raises(NoValidToken) as info:
                await source.get(A)
            assert "has not answered within 0.05s" in info.value.detail

    run(body)


def test_non_retryable_error_is_reported_and_not_hammered() -> None:
    async def body() -> None:
        source, attestor, clock, _ = make([])
        attestor.error = IdentityError(
            IdentityCode.INVALID_TARGET, "audience unknown to the issuer"
        )
        async with source:
            with pytest.raises(NoValidToken) as info:
                await source.get(A)
            assert info.value.cause is not None and info.value.cause.code == "invalid_target"
            clock.now += 5
            with pytest.raises(NoValidToken):
                await source.get(A)
            assert attestor.calls == [A]

    run(body)


def test_status_shows_claims_and_expiry_but_never_the_token() -> None:
    async def body() -> None:
        source, _, _, _ = make([A])
        async with source:
            await settle()
            (entry,) = source.status()
            assert entry["audience"] == A and entry["usable"] is True
            assert entry["claims"]["aud"] == A and entry["expires_in"] == 60.0
            assert "tok-1" not in repr(entry)

    run(body)


def test_attestor_bug_is_contained_and_reported() -> None:
    async def body() -> None:
        source, attestor, _, _ = make([])

        async def broken(audience: str) -> IssuedToken:
            raise KeyError("bug")

        attestor.fetch = broken  # type: ignore[method-assign]
        async with source:
            with pytest.raises(NoValidToken) as info:
                await source.get(A)
            assert "internal_error" in info.value.detail

    run(body)
