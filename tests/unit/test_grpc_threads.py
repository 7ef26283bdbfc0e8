"""The threaded gRPC engine drives the same sans-IO decision flow as the event loop: worker
threads take turns on the core, and the flow's I/O (a key refresh, an asynchronous replay
store) runs on an event loop in another thread. No sockets: ``Check`` is called directly."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from factory import NOW, Harness, Issuer, ec_key, make_harness

from sidecar.authz.decision import RequestView
from sidecar.authz.grpc_server import ThreadedAuthorizationServicer
from sidecar.authz.guard import CheckGuard
from sidecar.errors import ReplayStoreUnavailable
from sidecar.jose.rfc7517_jwk import import_public_jwk, public_jwk_dict


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def check_request(view: RequestView) -> Any:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host, http.scheme = (
        view.method,
        view.path,
        view.authority,
        (view.scheme),
    )
    for name, value in view.headers.items():
        http.headers[name] = value
    return req


def servicer(
    h: Harness, loop: asyncio.AbstractEventLoop, **kw: Any
) -> ThreadedAuthorizationServicer:
    h.authz.clock = lambda: NOW
    return ThreadedAuthorizationServicer(CheckGuard(h.authz, None, "grpc"), loop, "https", **kw)


def reason(response: Any) -> str:
    if response.HasField("ok_response"):
        return "allow"
    value: str = next(
        h.header.value for h in response.denied_response.headers if h.header.key == "x-authz-reason"
    )
    return value


class AsyncStore:
    """An asynchronous replay store (as Redis is): optionally down or hanging."""

    epoch = NOW - 3600  # started long ago

    def __init__(self, *, down: bool = False, hang: bool = False) -> None:
        self.seen: set[str] = set()
        self.down, self.hang = down, hang
        self.threads: set[str] = set()

    async def check_and_insert(self, key: str, now: float, ttl: float) -> bool:
        self.threads.add(threading.current_thread().name)
        if self.hang:
            await asyncio.sleep(30)
        if self.down:
            raise ReplayStoreUnavailable("store down")
        fresh = key not in self.seen
        self.seen.add(key)
        return fresh


def test_allow_then_replayed_with_the_in_memory_store(loop: asyncio.AbstractEventLoop) -> None:
    h = make_harness()
    svc = servicer(h, loop)
    req = check_request(h.dpop_request())
    assert reason(svc.Check(req, None)) == "allow"
    assert reason(svc.Check(req, None)) == "replayed"


def test_async_store_runs_on_the_loop(loop: asyncio.AbstractEventLoop) -> None:
    store = AsyncStore()
    h = make_harness(replay=store)  # type: ignore[arg-type]
    svc = servicer(h, loop)
    req = check_request(h.dpop_request())
    assert reason(svc.Check(req, None)) == "allow"
    assert reason(svc.Check(req, None)) == "replayed"
    # The store was awaited on the loop's thread, not in the calling worker.
    assert store.threads and threading.current_thread().name not in store.threads


@pytest.mark.parametrize("store", [AsyncStore(down=True), AsyncStore(hang=True)])
def test_store_down_or_silent_fails_closed(
    loop: asyncio.AbstractEventLoop, store: AsyncStore
) -> None:
    h = make_harness(replay=store)  # type: ignore[arg-type]
    svc = servicer(h, loop, io_timeout=0.2)
    assert reason(svc.Check(check_request(h.dpop_request()), None)) == "replay_store_unavailable"


def test_unknown_kid_is_refreshed_on_the_loop(loop: asyncio.AbstractEventLoop) -> None:
    h = make_harness()
    new_key = ec_key(2)
    calls: list[str] = []

    async def on_unknown_key(iss: str) -> bool:
        calls.append(threading.current_thread().name)
        h.keys.replace(
            iss,
            [
                import_public_jwk(h.issuer.jwk),
                import_public_jwk(public_jwk_dict(new_key, kid="es-2")),
            ],
        )
        return True

    h.authz.on_unknown_key = on_unknown_key
    rotated = Issuer(h.issuer.iss, "ES256", "es-2", new_key, frozenset({"ES256"}))
    svc = servicer(h, loop)
    view = h.dpop_request(token=rotated.token(jkt=h.client.thumbprint))
    assert reason(svc.Check(check_request(view), None)) == "allow"
    assert len(calls) == 1 and calls[0] != threading.current_thread().name


def test_a_silent_refresh_leaves_unknown_key(loop: asyncio.AbstractEventLoop) -> None:
    h = make_harness()

    async def on_unknown_key(iss: str) -> bool:
        await asyncio.sleep(30)
        return True

    h.authz.on_unknown_key = on_unknown_key
    svc = servicer(h, loop, io_timeout=0.2)
    view = h.dpop_request(token=h.token(kid="nope"))
    assert reason(svc.Check(check_request(view), None)) == "unknown_key"


def test_workers_in_parallel_accept_each_proof_exactly_once(
    loop: asyncio.AbstractEventLoop,
) -> None:
    h = make_harness()
    svc = servicer(h, loop)
    token = h.token()
    requests = [check_request(h.dpop_request(token=token)) for _ in range(200)]
    # Every request twice, shuffled across 8 workers: the core's caches and the in-memory
    # replay store see concurrent callers.
    work = requests + requests[::-1]
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda r: reason(svc.Check(r, None)), work))
    assert outcomes.count("allow") == 200
    assert outcomes.count("replayed") == 200
