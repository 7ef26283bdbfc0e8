"""Running a service: uvloop, signal handling, admin listener, the ready line tests wait for."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web


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


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    return runner, int(bound)


def announce(name: str, **ports: Any) -> None:
    """The single line tests and the demo wait for: every listener, with its real port."""
    fields = " ".join(f"{k}={v}" for k, v in ports.items() if v is not None)
    print(f"{name} ready {fields}", file=sys.stderr, flush=True)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    install_uvloop()
    asyncio.run(main())
