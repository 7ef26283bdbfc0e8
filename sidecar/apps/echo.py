"""A tiny "legacy app" for tests, the demo and benchmarks.

    python -m sidecar.apps.echo --host 127.0.0.1 --port 8080 [--name orders] [--access-log]

Every method on every path answers 200 with JSON describing what arrived::

    {"app": name, "method": "POST", "path": "/a?b=c", "headers": {"host": "..."}, "body_bytes": 12}

Header names are lower-cased; a repeated header is comma-joined (as Envoy does), so a test can
see a spoofed value next to the real one. The body is streamed and only counted, never held.
``GET /__health`` answers 200 ``ok``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable

from aiohttp import web
from aiohttp.log import access_logger

try:
    import uvloop

    _LOOP_FACTORY: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
except ImportError:  # pragma: no cover - uvloop is a dependency, but stay usable without it
    _LOOP_FACTORY = None

__all__ = ["HEALTH_PATH", "main", "make_app", "serve"]

HEALTH_PATH = "/__health"
APP_NAME_KEY = web.AppKey("app_name", str)


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _echo(request: web.Request) -> web.Response:
    body_bytes = 0
    async for chunk in request.content.iter_any():
        body_bytes += len(chunk)
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return web.json_response(
        {
            "app": request.app[APP_NAME_KEY],
            "method": request.method,
            "path": request.raw_path,
            "headers": headers,
            "body_bytes": body_bytes,
        }
    )


def make_app(name: str = "app") -> web.Application:
    """The echo application, for in-process use (aiohttp test client, AppRunner)."""
    app = web.Application()
    app[APP_NAME_KEY] = name
    app.router.add_get(HEALTH_PATH, _health)  # registered first: wins over the catch-all
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def serve(host: str, port: int, name: str, *, access_log: bool = False) -> None:
    """Serve until SIGTERM or SIGINT."""
    runner = web.AppRunner(make_app(name), access_log=access_logger if access_log else None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"echo app {name!r} listening on http://{host}:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.apps.echo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--name", default="app", help="reported as 'app' in every answer")
    parser.add_argument(
        "--access-log", action="store_true", help="log one line per request to stderr"
    )
    args = parser.parse_args(argv)
    if args.access_log:
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    with asyncio.Runner(loop_factory=_LOOP_FACTORY) as runner:
        runner.run(serve(args.host, args.port, args.name, access_log=args.access_log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
