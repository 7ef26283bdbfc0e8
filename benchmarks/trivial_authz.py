"""Always-allow ext_authz servers: the floor each transport of the sidecar is measured against.

    python -m benchmarks.trivial_authz --grpc 127.0.0.1:PORT --http 127.0.0.1:PORT [--engine loop]

They use the sidecar's own machinery where it is transport (the ``loop`` engine's HTTP/2 server
parsing each CheckRequest with upb; grpcio for the other engines; aiohttp on uvloop for HTTP),
but answer every check with a fixed allow: no decision core, no metric, no log. Prints one
``ready`` line when both listen; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc  # noqa: E402
from google.rpc import code_pb2, status_pb2  # noqa: E402

from sidecar.authz.grpc_h2 import GrpcH2Server  # noqa: E402
from sidecar.authz.grpc_server import CHECK_PATH, MAX_MESSAGE  # noqa: E402
from sidecar.listen_address import ListenAddress  # noqa: E402
from sidecar.runtime import run, wait_for_stop_signal  # noqa: E402

ALLOW = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=code_pb2.OK), ok_response=external_auth_pb2.OkHttpResponse()
)
ALLOW_BYTES: bytes = ALLOW.SerializeToString()


def loop_check(payload: bytes) -> bytes:
    external_auth_pb2.CheckRequest.FromString(payload)  # parse, as the real handler does
    return ALLOW_BYTES


class GrpcioAllow(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def Check(self, request: Any, context: Any) -> Any:
        return ALLOW


class GrpcioAioAllow(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(self, request: Any, context: Any) -> Any:
        return ALLOW


async def allow(request: web.Request) -> web.Response:
    return web.Response(status=200)


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


async def serve(args: argparse.Namespace) -> None:
    import concurrent.futures

    import grpc

    from sidecar.authz.grpc_server import _SERVER_OPTIONS

    host, port = _hostport(args.grpc)
    stop: Any
    if args.engine == "loop":
        h2 = GrpcH2Server({CHECK_PATH: loop_check}, max_concurrent=1000, max_message=MAX_MESSAGE)
        await h2.start(ListenAddress(host, port))
        stop = h2.stop
    else:
        server: Any
        if args.engine == "threads":
            pool = concurrent.futures.ThreadPoolExecutor(4)
            server = grpc.server(pool, options=_SERVER_OPTIONS)
            servicer: Any = GrpcioAllow()
        else:
            server = grpc.aio.server(options=_SERVER_OPTIONS)
            servicer = GrpcioAioAllow()
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
        server.add_insecure_port(f"{host}:{port}")
        started = server.start()
        if asyncio.iscoroutine(started):
            await started

        async def stop(grace: float) -> None:
            stopped = server.stop(grace)
            if asyncio.iscoroutine(stopped):
                await stopped

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", allow)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, *_hostport(args.http), backlog=1024).start()
    print("ready", flush=True)
    try:
        await wait_for_stop_signal()
    finally:
        await stop(0.5)
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpc", required=True, help="HOST:PORT for the gRPC server")
    parser.add_argument("--http", required=True, help="HOST:PORT for the HTTP server")
    parser.add_argument("--engine", choices=("loop", "threads", "aio"), default="loop")
    args = parser.parse_args()
    run(lambda: serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
