"""Envoy ext_authz v3 over gRPC: CheckRequest → RequestView → Decision → CheckResponse.

Protobuf classes come from ``xds-protos`` (upb: ~2 µs to parse a CheckRequest); the
betterproto classes of envoy-data-plane are far slower and stay out of this path.

Engines (``authz.grpc.engine``), all behind the one :class:`~sidecar.authz.guard.CheckGuard`:

* ``loop`` (default): our own HTTP/2 gRPC server (:mod:`sidecar.authz.grpc_h2`) on the
  sidecar's uvloop loop; a check without I/O is decided inside the read callback.
* ``threads``: grpcio's synchronous server with a small worker pool. Workers run the core's
  sans-IO flow under one lock and hand its rare I/O to the event loop.
* ``aio``: grpcio's asyncio server.

README "Benchmarks" has the measured cost of each.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Awaitable, Mapping
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2
from prometheus_client import CollectorRegistry

from sidecar.authz.core import IORequest, RefreshKeys
from sidecar.authz.decision import Allow, Decision, Header, RequestView
from sidecar.authz.forwarded import connection_scheme, request_method
from sidecar.authz.grpc_h2 import GrpcH2Server, refusal
from sidecar.authz.guard import Check, CheckGuard
from sidecar.errors import ReplayStoreUnavailable
from sidecar.listen_address import SOCKET_MODE, ListenAddress, remove_stale_socket, socket_umask
from sidecar.net_limits import GRPC_LIMITS, ConnLimits, ListenerGuard

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_OK = status_pb2.Status(code=code_pb2.OK)
_GRPC_CODE = {401: code_pb2.UNAUTHENTICATED, 403: code_pb2.PERMISSION_DENIED}


def view_from_check(request: Any, default_scheme: str = "http") -> RequestView:
    http = request.attributes.request.http
    headers = http.headers
    return RequestView(
        method=request_method(http.method),
        # Never http.scheme: that is the client's own ``:scheme`` (see authz.forwarded).
        scheme=connection_scheme(headers, default_scheme),
        authority=http.host or headers.get(":authority", ""),
        path=http.path,
        headers=headers,  # a protobuf map: read-only Mapping[str, str], no copy
    )


def _options(headers: tuple[Header, ...]) -> list[Any]:
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=k, value=v), append_action=_OVERWRITE
        )
        for k, v in headers
    ]


def _metadata(meta: Mapping[str, Any]) -> Any:
    md = struct_pb2.Struct()
    md.update({k: v for k, v in meta.items() if isinstance(v, str)})
    return md


def _render_head(decision: Decision) -> Any:
    """The CheckResponse without its dynamic metadata."""
    if isinstance(decision, Allow):
        return external_auth_pb2.CheckResponse(
            status=_OK,
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=_options(decision.headers_to_set),
                headers_to_remove=decision.headers_to_remove,
                response_headers_to_add=_options(decision.response_headers),
            ),
        )
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(
            code=_GRPC_CODE.get(decision.status, code_pb2.UNAVAILABLE), message=decision.detail
        ),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),
            headers=_options(decision.headers),
            body=decision.body,
        ),
    )


def render_check_response(decision: Decision) -> Any:
    response = _render_head(decision)
    response.dynamic_metadata.CopyFrom(_metadata(decision.metadata))
    return response


CHECK_PATH = b"/envoy.service.auth.v3.Authorization/Check"


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _BYTE[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_BYTE = [bytes((i,)) for i in range(0x80)]


def _metadata_entry(key: str, value: str) -> bytes:
    """One ``Struct.fields`` map entry {1: key, 2: Value{3: string_value}}, as field 1."""
    k, v = key.encode(), value.encode()
    val = b"\x1a" + _varint(len(v)) + v
    entry = b"\x0a" + _varint(len(k)) + k + b"\x12" + _varint(len(val)) + val
    return b"\x0a" + _varint(len(entry)) + entry


class ResponseEncoder:
    """Serialized CheckResponses: the part a decision's headers, status and body determine is
    cached by exactly that content (most checks repeat one of a few: the same caller, the same
    deny); the per-request dynamic metadata (jtis) is appended to it. Protobuf's wire format
    allows this: a message is the concatenation of its fields."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._heads: dict[tuple[Any, ...], bytes] = {}
        self._entries: dict[tuple[str, str], bytes] = {}  # sub, iss, kid, rule repeat
        # Whole responses by decision object: the core's decision cache answers repeated
        # bearer checks with the same Allow object. The object is held with its bytes, so its
        # id cannot be reused by another decision while the entry exists.
        self._by_object: dict[int, tuple[Decision, bytes]] = {}

    def _metadata(self, meta: Mapping[str, Any]) -> bytes:
        """``CheckResponse.dynamic_metadata`` (field 4), a Struct of the string values,
        encoded by hand: building it through ``Struct.update`` cost more than the whole
        rest of the response (measured)."""
        entries = self._entries
        parts = []
        for item in meta.items():
            if isinstance(item[1], str):
                entry = entries.get(item)
                if entry is None:
                    entry = _metadata_entry(*item)
                    if item[0] != "proof_jti":  # never repeats: not worth keeping
                        if len(entries) >= self.size:
                            entries.clear()
                        entries[item] = entry
                parts.append(entry)
        body = b"".join(parts)
        return b"\x22" + _varint(len(body)) + body

    def __call__(self, decision: Decision) -> bytes:
        known = self._by_object.get(id(decision))
        if known is not None and known[0] is decision:
            return known[1]
        key: tuple[Any, ...]
        if isinstance(decision, Allow):
            key = (decision.headers_to_set, decision.headers_to_remove, decision.response_headers)
        else:
            key = (decision.status, decision.detail, decision.headers, decision.body)
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) >= self.size:
                self._heads.clear()  # bounded; refilled by the next checks
            head = self._heads[key] = _render_head(decision).SerializeToString()
        answer = head + self._metadata(decision.metadata)
        if isinstance(decision, Allow) and "proof_jti" not in decision.metadata:
            # An allow without a proof may come back as the same object (decision cache).
            if len(self._by_object) >= self.size:
                self._by_object.clear()
            self._by_object[id(decision)] = (decision, answer)
        return answer


class LoopCheckHandler:
    """The ``loop`` engine's ``Check``: serialized CheckRequest in, serialized CheckResponse
    out, decided on the event loop inside the h2 server's ``data_received`` unless the flow
    needs I/O. The request is parsed here with upb (grpcio's per-call machinery is gone)."""

    def __init__(self, guard: CheckGuard, default_scheme: str = "http") -> None:
        self.guard = guard
        self.default_scheme = default_scheme
        self._parse = external_auth_pb2.CheckRequest.FromString
        self._encode = ResponseEncoder()

    def _view(self, payload: bytes) -> RequestView:
        return view_from_check(self._parse(payload), self.default_scheme)

    def __call__(self, payload: bytes) -> bytes | Awaitable[bytes]:
        check = self.guard.begin(self._view, payload)
        if isinstance(check.step, IORequest):
            return self._finish(check)
        return self._encode(self.guard.end(check))

    async def _finish(self, check: Check) -> bytes:
        # Cancelled at Envoy's deadline or reset: Envoy has denied already, nothing to count.
        await self.guard.finish_io(check)
        return self._encode(self.guard.end(check))


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """The ``aio`` engine: ``Check`` is a coroutine on grpcio's asyncio server."""

    def __init__(self, guard: CheckGuard, default_scheme: str = "http") -> None:
        self.guard = guard
        self.default_scheme = default_scheme

    def _view(self, request: Any) -> RequestView:
        return view_from_check(request, self.default_scheme)

    async def Check(self, request: Any, context: Any) -> Any:  # gRPC method name
        return render_check_response(await self.guard.check(self._view, request))


class ThreadedAuthorizationServicer(AuthorizationServicer):
    """The ``threads`` engine: ``Check`` runs in a grpcio worker thread."""

    def __init__(
        self,
        guard: CheckGuard,
        loop: asyncio.AbstractEventLoop,
        default_scheme: str = "http",
        io_timeout: float = 5.0,
    ) -> None:
        super().__init__(guard, default_scheme)
        self.loop = loop
        self.io_timeout = io_timeout
        # The core's caches (verified tokens, proof keys, the in-memory replay store) are
        # built for one thread at a time: workers take turns; the event loop only does I/O.
        self._lock = threading.Lock()

    def Check(self, request: Any, context: Any) -> Any:
        guard = self.guard
        with self._lock:
            check = guard.begin(self._view, request)
        while isinstance(check.step, IORequest):
            # The lock is released while the loop does the I/O: other workers go on.
            reply, error = self._perform(check.step)
            with self._lock:
                guard.resume(check, reply, error)
        return render_check_response(guard.end(check))

    def _perform(self, io: IORequest) -> tuple[Any, Exception | None]:
        future = asyncio.run_coroutine_threadsafe(self.guard.authorizer.perform(io), self.loop)
        try:
            return future.result(self.io_timeout), None
        except ReplayStoreUnavailable as exc:
            return None, exc
        except concurrent.futures.TimeoutError:
            future.cancel()
            if isinstance(io, RefreshKeys):
                return False, None  # no new keys in time: the deny stays unknown_key
            return None, ReplayStoreUnavailable("replay store did not answer in time")


MAX_MESSAGE = 1 << 20  # bounded: 1 MiB per CheckRequest

_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.so_reuseport", 0),
    ("grpc.http2.max_pings_without_data", 0),
]

Engine = LoopCheckHandler | AuthorizationServicer


async def start_grpc_server(
    engine: Engine,
    address: ListenAddress,
    *,
    max_concurrent: int = 1000,
    workers: int = 4,
    limits: ConnLimits = GRPC_LIMITS,
    registry: CollectorRegistry | None = None,
) -> tuple[Any, ListenAddress]:
    """Serve ``engine`` (its class picks the server); returns the server and the address it
    bound (the real port when 0 was asked for).

    Beyond ``max_concurrent`` calls in progress (per connection for ``loop``) the call is
    refused, which Envoy (failure mode closed) turns into a deny: bounded, and never an allow.
    The ``loop`` engine's connections are kept to ``limits`` (metrics in ``registry``)."""
    server: Any
    if isinstance(engine, LoopCheckHandler):
        guard = ListenerGuard(
            "authz_grpc",
            limits,
            registry if registry is not None else CollectorRegistry(),
            refusal=refusal,
        )
        server = GrpcH2Server(
            {CHECK_PATH: engine},
            max_concurrent=max_concurrent,
            max_message=MAX_MESSAGE,
            guard=guard,
        )
        return server, await server.start(address)
    if isinstance(engine, ThreadedAuthorizationServicer):
        server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="ext_authz"),
            maximum_concurrent_rpcs=max_concurrent,
            options=_SERVER_OPTIONS,
        )
    else:
        server = grpc.aio.server(maximum_concurrent_rpcs=max_concurrent, options=_SERVER_OPTIONS)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(engine, server)
    if address.path is not None:
        remove_stale_socket(address.path)
        with socket_umask():  # grpcio binds here: the socket is created 0600
            bound = server.add_insecure_port(address.grpc_target())
        os.chmod(address.path, SOCKET_MODE)
    else:
        bound = server.add_insecure_port(address.grpc_target())
        address = ListenAddress(address.host, bound)
    if bound == 0:
        raise OSError(f"cannot listen on {address} for ext_authz gRPC")
    started = server.start()
    if asyncio.iscoroutine(started):
        await started
    return server, address


async def stop_grpc_server(server: Any, grace: float = 1.0) -> None:
    if isinstance(server, GrpcH2Server):
        await server.stop(grace)
        return
    stopped = server.stop(grace)
    if asyncio.iscoroutine(stopped):
        await stopped
    else:  # the threaded server returns a threading.Event
        await asyncio.to_thread(stopped.wait, grace + 1.0)
