"""A passive wire tap for the demo: it sits between a sidecar's egress and Envoy, forwards
everything unchanged (Host included, so DPoP's htu still matches) and remembers the last
request — the position of an attacker who can read traffic but holds no key."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass

import aiohttp
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass(frozen=True)
class Captured:
    method: str
    path: str
    headers: dict[str, str]


class WireTap:
    def __init__(self, upstream_port: int) -> None:
        self.upstream = f"http://127.0.0.1:{upstream_port}"
        self.last: Captured | None = None
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        self.last = Captured(request.method, request.path_qs, dict(headers))
        body = await request.read()
        assert self._session is not None
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body or None
        ) as resp:
            payload = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
            out.pop("Content-Length", None)
            return web.Response(status=resp.status, body=payload, headers=out)

    async def _main(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self._ready.set()
        while True:
            await asyncio.sleep(3600)

    def start(self) -> int:
        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self._main())
            except asyncio.CancelledError:
                pass
            finally:
                self._loop.run_until_complete(self._cleanup())
                self._loop.close()

        self._thread = threading.Thread(target=run, name="wiretap", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("wire tap did not start")
        return self.port

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return

        def cancel_all() -> None:
            # In the loop's own thread: cancelling one task by one from outside races with
            # the loop closing as soon as the main task ends.
            for task in asyncio.all_tasks(loop):
                task.cancel()

        with contextlib.suppress(RuntimeError):  # already closed: nothing left to stop
            loop.call_soon_threadsafe(cancel_all)
        self._thread.join(timeout=5)
