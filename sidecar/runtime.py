"""Running a service: uvloop, signal handling, admin listener, the ready line tests wait for."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.listen_address import ListenAddress, bind_unix
from sidecar.net_limits import (
    ADMIN_LIMITS,
    ConnLimits,
    GuardedSite,
    ListenerGuard,
    server_options,
)
from sidecar.observability.logs import plain_event


def install_uvloop() -> None:
    if os.environ.get("SIDECAR_EVENT_LOOP") == "asyncio":  # for comparisons in benchmarks
        return
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def wait_for_stop_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def start_admin_site(
    app: web.Application,
    host: str,
    port: int,
    registry: CollectorRegistry,
    limits: ConnLimits = ADMIN_LIMITS,
) -> tuple[web.AppRunner, int]:
    """The admin listener (``/healthz``, ``/readyz``, ``/metrics``), with the admin limits."""
    runner, bound = await start_admin_at(app, ListenAddress(host, port), registry, limits)
    return runner, bound.port


async def start_admin_at(
    app: web.Application,
    address: ListenAddress,
    registry: CollectorRegistry,
    limits: ConnLimits = ADMIN_LIMITS,
) -> tuple[web.AppRunner, ListenAddress]:
    """:func:`start_admin_site` on any address (a worker's admin is a unix socket)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, **server_options(limits))
    await runner.setup()
    guard = ListenerGuard("admin", limits, registry)
    return runner, await start_listener_site(runner, address, guard)


async def start_listener_site(
    runner: web.AppRunner, address: ListenAddress, guard: ListenerGuard, backlog: int = 1024
) -> ListenAddress:
    """Bind ``runner`` (already set up, with :func:`server_options` of ``guard.limits``) to a
    TCP address or a 0600 unix socket, its connections kept by ``guard``; returns the address
    bound (the real port when 0 was asked for)."""
    if address.path is not None:
        sock = bind_unix(address.path, backlog)
        await GuardedSite(runner, guard, sock, backlog=backlog).start()
        return address
    await GuardedSite(runner, guard, (address.host, address.port), backlog=backlog).start()
    # One site per runner here: its TCP address carries the real port.
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    return ListenAddress(address.host, int(port))


def announce(name: str, **ports: Any) -> None:
    """The single line tests and the demo wait for: every listener, with its real port."""
    fields = {k: v for k, v in ports.items() if v is not None}
    # Printed, not logged: it must show whatever --log-level says; in the --log-format.
    print(plain_event(f"{name} ready", fields), file=sys.stderr, flush=True)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    install_uvloop()
    asyncio.run(main())
