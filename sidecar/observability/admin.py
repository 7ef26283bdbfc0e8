"""Admin endpoints: /healthz (the process is up), /readyz (it can decide), /metrics."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from sidecar.observability.metrics import process_metrics

Readiness = tuple[bool, str]


def make_admin_app(
    registry: CollectorRegistry,
    readiness: Callable[[], Readiness | Awaitable[Readiness]],
    *,
    before_scrape: Callable[[], Awaitable[None]] | None = None,
) -> web.Application:
    """``readiness`` may be a coroutine function (the worker parent asks its workers);
    ``before_scrape`` runs before each ``/metrics`` (it gathers the workers' metrics). Every
    ``/metrics`` also carries the process collectors and the build info."""
    process_metrics(registry)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        answer = readiness()
        ready, why = await answer if inspect.isawaitable(answer) else answer
        return web.Response(status=200 if ready else 503, text=why + "\n")

    async def metrics(_: web.Request) -> web.Response:
        if before_scrape is not None:
            await before_scrape()
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
