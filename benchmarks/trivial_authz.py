"""Always-allow ext_authz servers: the floor each transport of the sidecar is measured against.

    python -m benchmarks.trivial_authz --grpc 127.0.0.1:PORT --http 127.0.0.1:PORT [--engine loop]
        [--answer plain|bearer-allow]

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

from sidecar.authz.core import STRIPPED  # noqa: E402
from sidecar.authz.decision import Allow, Identity  # noqa: E402
from sidecar.authz.grpc_h2 import GrpcH2Server  # noqa: E402
from sidecar.authz.grpc_server import CHECK_PATH, MAX_MESSAGE, render_check_response  # noqa: E402
from sidecar.authz.http_server import render_http_response  # noqa: E402
from sidecar.listen_address import ListenAddress  # noqa: E402
from sidecar.runtime import run, wait_for_stop_signal  # noqa: E402

ALLOW = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=code_pb2.OK), ok_response=external_auth_pb2.OkHttpResponse()
)
ALLOW_BYTES: bytes = ALLOW.SerializeToString()


def loop_check(payload: bytes) -> bytes:
    external_auth_pb2.CheckRequest.FromString(payload)  # parse, as the real handler does
    return ALLOW_BYTES


def bearer_allow() -> Allow:
    """An allow shaped like the sidecar's answer to a cached bearer check (identity headers,
    the headers to remove, dynamic metadata), for ``--answer bearer-allow``: the trivial server
    then sends what the sidecar sends, and the difference left is the deciding."""
    identity = Identity(
        "spiffe://demo.local/ns/shop/sa/frontend",
        "https://issuer.demo.local",
        "bearer",
        None,
        "frontend",
        "0f8c2b9e-41d7-4c55-9a57-0a1b2c3d4e5f",
        "frontend-orders",
    )
    headers = (
        ("x-workload-id", identity.subject),
        ("x-workload-issuer", identity.issuer),
        ("x-workload-auth", identity.auth),
        ("x-workload-client-id", "frontend"),
    )
    meta = {
        "sub": identity.subject,
        "iss": identity.issuer,
        "token_jti": identity.token_jti,
        "kid": "es-1",
        "rule": identity.rule,
        "auth": "bearer",
    }
    return Allow(identity, headers, STRIPPED, (), meta)


BEARER_ALLOW_BYTES: bytes = render_check_response(bearer_allow()).SerializeToString()


def loop_check_bearer_allow(payload: bytes) -> bytes:
    external_auth_pb2.CheckRequest.FromString(payload)
    return BEARER_ALLOW_BYTES


class GrpcioAllow(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def Check(self, request: Any, context: Any) -> Any:
        return ALLOW


class GrpcioAioAllow(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(self, request: Any, context: Any) -> Any:
        return ALLOW


async def allow(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def allow_like_bearer(request: web.Request) -> web.Response:
    return render_http_response(bearer_allow())


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
        handler = loop_check_bearer_allow if args.answer == "bearer-allow" else loop_check
        h2 = GrpcH2Server({CHECK_PATH: handler}, max_concurrent=1000, max_message=MAX_MESSAGE)
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
    app.router.add_route(
        "*", "/{tail:.*}", allow_like_bearer if args.answer == "bearer-allow" else allow
    )
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
    parser.add_argument(
        "--answer",
        choices=("plain", "bearer-allow"),
        default="plain",
        help="an empty OK (default), or the sidecar's bearer allow (loop engine and HTTP)",
    )
    args = parser.parse_args()
    run(lambda: serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
