"""A trivial forwarding proxy on aiohttp and uvloop: the floor the egress proxy is measured
against (same framework, no identity, no proof, no header rules).

    python -m benchmarks.trivial_proxy --listen 127.0.0.1:PORT --upstream http://127.0.0.1:PORT

Forwards method, path, headers (less hop-by-hop ones) and body over one pooled client session;
answers with the upstream's status, headers and body. Prints ``ready``; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from sidecar.runtime import run, wait_for_stop_signal  # noqa: E402

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "host",
        "proxy-connection",
        "te",
        "trailer",
        "content-length",
    }
)


async def serve(listen: str, upstream: str) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        async with session.request(
            request.method, upstream + request.raw_path, headers=headers, data=body or None
        ) as resp:
            data = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=resp.status, body=data, headers=out)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    await web.TCPSite(runner, host, int(port), backlog=1024).start()
    print("ready", flush=True)
    try:
        await wait_for_stop_signal()
    finally:
        await runner.cleanup()
        await session.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    run(lambda: serve(args.listen, args.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
