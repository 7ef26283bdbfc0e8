"""Following the revocation list: the broker's long-poll hold (RevocationStore.wait_for_change),
the RFC 7240 wait preference, and the verifier's poller against real local HTTP servers — one
that long-polls, one that answers at once (fallback to interval polling), one that fails."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from sidecar.authz.revocation import (
    MIN_SPACING,
    RETRY_CAP,
    RETRY_FIRST,
    RevocationList,
    RevocationPoller,
    next_delay,
)
from sidecar.broker.revocation import RevocationStore
from sidecar.revocation_wire import CHANGED_HEADER, wait_preference


@pytest.mark.parametrize(
    ("values", "wait"),
    [
        ([], None),
        (["wait=10"], 10),
        (["respond-async, wait=5"], 5),
        (["return=minimal; foo=bar", "Wait = 7"], 7),
        (['wait="3"'], 3),
        (["wait=-1"], None),
        (["wait=1.5"], None),
        (["wait=9999999999"], None),
        (["handling=strict"], None),
    ],
)
def test_wait_preference(values: list[str], wait: int | None) -> None:
    assert wait_preference(values) == wait


def test_next_delay() -> None:
    # Long-poll: the next request goes out at once, but never more often than MIN_SPACING.
    assert next_delay(ok=True, long_poll=True, elapsed=9.0, failures=0, interval=5, jitter=0) == 0
    assert next_delay(
        ok=True, long_poll=True, elapsed=0.0, failures=0, interval=5, jitter=0
    ) == pytest.approx(MIN_SPACING)
    # An issuer that does not long-poll: the interval.
    assert next_delay(ok=True, long_poll=False, elapsed=0.0, failures=0, interval=5, jitter=0) == 5
    # Errors: from RETRY_FIRST, doubling, capped, jittered down to half.
    delays = [
        next_delay(ok=False, long_poll=False, elapsed=0, failures=n, interval=5, jitter=0.999)
        for n in range(1, 12)
    ]
    assert delays[0] == pytest.approx(RETRY_FIRST, rel=0.01)
    assert delays == sorted(delays) and max(delays) <= RETRY_CAP
    assert delays[-1] == pytest.approx(RETRY_CAP, rel=0.01)
    assert next_delay(
        ok=False, long_poll=False, elapsed=0, failures=1, interval=5, jitter=0
    ) == pytest.approx(RETRY_FIRST / 2)
    # A long interval is never undercut by the error cap.
    assert next_delay(
        ok=False, long_poll=False, elapsed=0, failures=30, interval=60, jitter=0.999
    ) == pytest.approx(60, rel=0.01)


def test_the_hold_ends_on_a_change_on_the_deadline_or_on_close() -> None:
    async def scenario() -> None:
        store = RevocationStore(None, jti_retention=100)
        etag = store.published().etag

        # A change wakes the holder at once.
        started = time.monotonic()
        holder = asyncio.create_task(store.wait_for_change(etag, 5))
        await asyncio.sleep(0.05)
        assert store.waiting == 1
        store.revoke_subject("spiffe://t/a")
        await asyncio.wait_for(holder, 1)
        assert time.monotonic() - started < 0.5 and store.waiting == 0

        # Revoke and restore again before the holder looks: same ETag, so it keeps holding
        # until its deadline.
        etag = store.published().etag
        started = time.monotonic()
        holder = asyncio.create_task(store.wait_for_change(etag, 0.3))
        await asyncio.sleep(0.05)
        store.revoke_subject("spiffe://t/b")
        store.restore_subject("spiffe://t/b")
        await holder
        assert 0.28 <= time.monotonic() - started < 1.0

        # A stale or absent If-None-Match is never held.
        started = time.monotonic()
        await store.wait_for_change('"stale"', 5)
        await store.wait_for_change(None, 5)
        assert time.monotonic() - started < 0.1

        # Closing releases every holder.
        holders = [asyncio.create_task(store.wait_for_change(etag, 30)) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert store.waiting == 3
        store.close()
        await asyncio.wait_for(asyncio.gather(*holders), 1)
        assert store.waiting == 0

    asyncio.run(scenario())


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/revocations", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    return runner, f"http://127.0.0.1:{port}/revocations"


def follow(handler: Handler, target: RevocationList, seconds: float) -> None:
    """Run a poller (interval 0.5 s, wait 10 s) against ``handler`` for ``seconds``."""

    async def scenario() -> None:
        runner, url = await serve(handler)
        task = asyncio.create_task(RevocationPoller(url, target, interval=0.5, wait=10).run())
        try:
            await asyncio.sleep(seconds)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await runner.cleanup()

    asyncio.run(scenario())


def document(subjects: list[str]) -> bytes:
    return json.dumps({"subjects": subjects, "jtis": []}).encode()


def test_an_issuer_without_long_poll_is_polled_at_the_interval() -> None:
    """An older issuer ignores Prefer and answers at once: the poller must not turn the
    missing hold into a request storm."""
    seen: list[dict[str, str]] = []

    async def immediate(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"'})
        return web.Response(body=document(["spiffe://t/a"]), headers={"ETag": '"v1"'})

    target = RevocationList()
    follow(immediate, target, 1.3)
    assert target.subjects == {"spiffe://t/a"}
    assert 2 <= len(seen) <= 3, f"{len(seen)} requests in 1.3 s at a 0.5 s interval"
    assert all(h.get("Prefer") == "wait=10" for h in seen)
    assert seen[1].get("If-None-Match") == '"v1"'


def test_a_long_polling_issuer_is_asked_again_at_once_and_propagation_is_measured() -> None:
    changes = asyncio.Event()
    requests = 0

    async def long_poll(request: web.Request) -> web.Response:
        nonlocal requests
        requests += 1
        applied = {"Preference-Applied": "wait=10"}
        if request.headers.get("If-None-Match") == '"v1"':
            await changes.wait()
            return web.Response(
                body=document(["spiffe://t/a", "spiffe://t/b"]),
                headers={"ETag": '"v2"', CHANGED_HEADER: f"{time.time() - 0.2:.3f}", **applied},
            )
        if request.headers.get("If-None-Match") == '"v2"':
            await asyncio.sleep(10)
        return web.Response(
            body=document(["spiffe://t/a"]),
            headers={"ETag": '"v1"', CHANGED_HEADER: "1000.000", **applied},
        )

    propagated: list[float] = []

    async def scenario() -> tuple[RevocationList, RevocationPoller]:
        runner, url = await serve(long_poll)
        target = RevocationList()
        poller = RevocationPoller(url, target, interval=5, wait=10, on_propagated=propagated.append)
        task = asyncio.create_task(poller.run())
        try:
            await asyncio.sleep(0.5)  # first list, then held
            assert target.subjects == {"spiffe://t/a"} and requests == 2
            changes.set()
            started = time.monotonic()
            while "spiffe://t/b" not in target.subjects:
                assert time.monotonic() - started < 1.0
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)  # asks again at once (held again now)
            assert requests == 3
            assert poller.silence() < 1.0
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await runner.cleanup()
        return target, poller

    target, _ = asyncio.run(scenario())
    assert target.version == '"v2"'
    # The first list (changed "long ago") is not a propagation; the change is, ~0.2 s.
    assert len(propagated) == 1 and 0.15 < propagated[0] < 1.0


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, b""),
        (404, b""),
        (200, b"[]"),
        (200, b'{"subjects": "spiffe://t/a", "jtis": []}'),
        (200, b'{"subjects": [1], "jtis": []}'),
        (200, b'{"jtis": []}'),
        (200, b"{not json"),
    ],
)
def test_failures_keep_the_list_and_back_off(status: int, body: bytes) -> None:
    requests = 0

    async def failing(_: web.Request) -> web.Response:
        nonlocal requests
        requests += 1
        return web.Response(status=status, body=body, headers={"ETag": '"bad"'})

    target = RevocationList()
    target.replace(subjects=frozenset({"spiffe://t/old"}), jtis=frozenset(), version='"v0"')
    follow(failing, target, 1.5)
    assert target.subjects == {"spiffe://t/old"} and target.version == '"v0"'
    # Backoff from 0.25-0.5 s, doubling: a handful of requests in 1.5 s, not a storm.
    assert 2 <= requests <= 5, requests
