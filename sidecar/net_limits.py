"""Connection limits shared by every HTTP listener of the project: the egress listeners, the
broker's HTTP port, attestation socket and admin socket, the HTTP ext_authz port and the admin
ports.

Left alone, aiohttp keeps a connection for as long as the peer likes: a request head sent a byte
at a time (slow-loris), a body that never ends, a response nobody reads, and any number of them.
A :class:`ListenerGuard` wraps the protocol of each accepted connection and enforces, per
listener (:class:`ConnLimits`):

* ``max_connections`` open at once and, on the attestation socket, ``max_per_uid`` per caller
  uid (``SO_PEERCRED``). Over either, the connection gets a canned ``503`` and is closed at
  once: one local process cannot take every slot from the others;
* ``header_timeout``: a request's head must be complete this long after the connection opened
  or after the request's first byte;
* ``body_timeout`` (``0``: none): its body must be complete this long after the head;
* ``idle_timeout``: aiohttp's keep-alive limit between requests, and the limit on a body that
  stops arriving or on a response the client stops reading.

The gRPC ext_authz server (HTTP/2, :mod:`sidecar.authz.grpc_h2`) is kept by the same guard: its
protocol answers :meth:`GuardedConnection.overdue` itself (idle there means no stream open).

Deadlines are checked by one sweep per listener (a quarter of the shortest timeout, at most a
second): nothing is scheduled per request or per read. A late connection is aborted.

:class:`FdWatch` makes running out of file descriptors visible. With uvloop (the default) a
connection that cannot be accepted at the limit is reset by libuv without telling anyone, and
asyncio's own loop logs one error per attempt: the watch counts and logs both, rate-limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
import socket
import ssl
import time
import weakref
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, cast

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from sidecar.config_util import get_duration, get_int, known_keys, section
from sidecar.errors import ConfigError
from sidecar.observability.logs import RateLimitedLog

log = logging.getLogger(__name__)

_now = time.monotonic
#: How often a refusal or a fd shortage is logged at most (the lines carry a count).
LOG_EVERY = 10.0
_log = RateLimitedLog(log, LOG_EVERY)


@dataclass(frozen=True, slots=True)
class ConnLimits:
    max_connections: int = 1024
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    idle_timeout: float = 60.0
    #: Only where the peer's uid is known (the attestation socket); 0: no per-uid cap.
    max_per_uid: int = 0

    @property
    def sweep_interval(self) -> float:
        shortest = min(t for t in (self.header_timeout, self.body_timeout, self.idle_timeout) if t)
        return min(1.0, max(0.02, shortest / 4))


#: Defaults per listener kind. Bodies through the egress are streamed uploads of any length:
#: only a body that stops arriving is cut there.
EGRESS_LIMITS = ConnLimits(body_timeout=0.0)
HTTP_LIMITS = ConnLimits()
#: The gRPC ext_authz port (HTTP/2): body is a call's message after its HEADERS.
GRPC_LIMITS = ConnLimits()
ATTESTATION_LIMITS = ConnLimits(header_timeout=5.0, body_timeout=5.0, max_per_uid=64)
#: The admin ports and the broker's admin socket (not configurable: a scraper and an operator).
ADMIN_LIMITS = ConnLimits(max_connections=64)


def parse_conn_limits(data: Any, path: str, default: ConnLimits) -> ConnLimits:
    """A ``connections`` section; ``max_per_uid`` is known only where ``default`` has one."""
    raw: Mapping[str, Any] = section(data, path)
    allowed = {"max_connections", "header_timeout", "body_timeout", "idle_timeout"}
    if default.max_per_uid:
        allowed.add("max_per_uid")
    known_keys(raw, path, allowed)
    limits = replace(
        default,
        max_connections=get_int(raw, "max_connections", path, default.max_connections, minimum=1),
        header_timeout=get_duration(
            raw, "header_timeout", path, default.header_timeout, minimum=0.1
        ),
        body_timeout=get_duration(raw, "body_timeout", path, default.body_timeout),
        idle_timeout=get_duration(raw, "idle_timeout", path, default.idle_timeout, minimum=0.1),
    )
    if default.max_per_uid:
        per_uid = get_int(raw, "max_per_uid", path, default.max_per_uid, minimum=1)
        if per_uid > limits.max_connections:
            raise ConfigError(
                f"{path}.max_per_uid",
                f"at most max_connections ({limits.max_connections})",
                per_uid,
            )
        limits = replace(limits, max_per_uid=per_uid)
    return limits


# -- metrics --------------------------------------------------------------------------------------


class ConnectionMetrics:
    """One set per registry: every listener of a process reports under its own label."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge(
            "sidecar_connections_open",
            "Open connections by listener",
            ["listener"],
            registry=registry,
        )
        self.rejected = Counter(
            "sidecar_connections_rejected",
            "Connections refused at accept, by listener and reason",
            ["listener", "reason"],
            registry=registry,
        )
        self.timed_out = Counter(
            "sidecar_connections_timed_out",
            "Connections aborted for a missed deadline, by listener and reason",
            ["listener", "reason"],
            registry=registry,
        )
        self.fd_exhausted = Counter(
            "sidecar_fd_exhausted",
            "Times the process was found out of file descriptors (new connections refused)",
            registry=registry,
        )
        self.open_fds = Gauge(
            "sidecar_open_fds", "Open file descriptors (last check)", registry=registry
        )
        self.fd_limit = Gauge(
            "sidecar_fd_limit", "The process's file-descriptor limit (soft)", registry=registry
        )


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, ConnectionMetrics] = (
    weakref.WeakKeyDictionary()
)


def connection_metrics(registry: CollectorRegistry) -> ConnectionMetrics:
    metrics = _METRICS.get(registry)
    if metrics is None:
        metrics = _METRICS[registry] = ConnectionMetrics(registry)
    return metrics


# -- the guard ------------------------------------------------------------------------------------

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def busy_response(reason: str) -> bytes:
    body = json.dumps(
        {
            "error": "temporarily_unavailable",
            "error_description": f"too many connections ({reason})",
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nCache-Control: no-store\r\n"
        "X-Sidecar-Error: too_many_connections\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedConnection(Protocol):
    """What a :class:`ListenerGuard` needs of a connection: :class:`GuardedProtocol` for aiohttp,
    the gRPC server's own protocol for HTTP/2."""

    uid: int | None

    def overdue(self, now: float, limits: ConnLimits) -> str | None: ...

    def abort(self) -> None: ...


class ListenerGuard:
    """The connections of one listener: admission, per-uid counts, deadlines. ``refusal``
    is what a connection over a cap is sent before it is closed."""

    def __init__(
        self,
        name: str,
        limits: ConnLimits,
        registry: CollectorRegistry,
        *,
        peer_uid: Callable[[asyncio.BaseTransport], int | None] | None = None,
        on_open: Callable[[asyncio.BaseTransport], None] | None = None,
        on_close: Callable[[asyncio.BaseTransport], None] | None = None,
        refusal: Callable[[str], bytes] = busy_response,
    ) -> None:
        self.name = name
        self._refusal = refusal
        self.limits = limits
        self._peer_uid = peer_uid
        self._on_open = on_open
        self._on_close = on_close
        self._conns: dict[asyncio.BaseTransport, GuardedConnection] = {}
        self._per_uid: Tally[int] = Tally()
        self._sweeper: asyncio.Task[None] | None = None
        metrics = connection_metrics(registry)
        metrics.open.labels(name).set_function(lambda: len(self._conns))
        self._rejected = {
            r: metrics.rejected.labels(name, r) for r in ("max_connections", "max_per_uid")
        }
        self._timed_out = {
            r: metrics.timed_out.labels(name, r)
            for r in (
                "header_timeout",
                "body_timeout",
                "body_stalled",
                "send_stalled",
                "idle_timeout",
            )
        }

    def __len__(self) -> int:
        return len(self._conns)

    def protocol_factory(self, inner: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        return lambda: GuardedProtocol(inner(), self)

    def wrap_handler(self, handler: Handler) -> Handler:
        """Marks a connection busy while a request is handled (its head is complete)."""
        conns = self._conns

        async def guarded(request: web.BaseRequest) -> web.StreamResponse:
            # An aiohttp listener's connections are all GuardedProtocol.
            conn = cast(
                "GuardedProtocol | None",
                conns.get(request.transport),  # type: ignore[arg-type]
            )
            if conn is None:  # pragma: no cover - the connection went away meanwhile
                return await handler(request)
            conn.request = request
            conn.busy = True
            conn.head_since = None
            conn.request_since = _now()
            try:
                return await handler(request)
            finally:
                conn.busy = False

        return guarded

    # -- admission ------------------------------------------------------------------------

    def admit(self, conn: GuardedConnection, transport: asyncio.BaseTransport) -> bool:
        limits = self.limits
        if len(self._conns) >= limits.max_connections:
            self._refuse(transport, "max_connections", f"{limits.max_connections} open")
            return False
        uid = None
        if self._peer_uid is not None and limits.max_per_uid:
            uid = self._peer_uid(transport)
            if uid is not None and self._per_uid[uid] >= limits.max_per_uid:
                self._refuse(transport, "max_per_uid", f"{limits.max_per_uid} open by uid {uid}")
                return False
            if uid is not None:
                self._per_uid[uid] += 1
        conn.uid = uid
        self._conns[transport] = conn
        if self._on_open is not None:
            self._on_open(transport)
        return True

    def _refuse(self, transport: asyncio.BaseTransport, reason: str, detail: str) -> None:
        self._rejected[reason].inc()
        _log.warning(
            (self.name, reason),
            "listener %s: connection refused: %s (%s)",
            self.name,
            reason,
            detail,
        )
        with contextlib.suppress(Exception):
            transport.write(self._refusal(reason))  # type: ignore[attr-defined]
        transport.close()

    def release(self, conn: GuardedConnection, transport: asyncio.BaseTransport) -> None:
        if self._conns.pop(transport, None) is None:
            return
        if conn.uid is not None:
            left = self._per_uid[conn.uid] - 1
            if left > 0:
                self._per_uid[conn.uid] = left
            else:
                del self._per_uid[conn.uid]
        if self._on_close is not None:
            self._on_close(transport)

    # -- deadlines --------------------------------------------------------------------------

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep_forever(self) -> None:
        interval = self.limits.sweep_interval
        while True:
            await asyncio.sleep(interval)
            self.sweep(_now())

    def sweep(self, now: float) -> None:
        for conn in list(self._conns.values()):
            reason = conn.overdue(now, self.limits)
            if reason is not None:
                self._timed_out[reason].inc()
                log.debug("listener %s: connection aborted: %s", self.name, reason)
                conn.abort()


class GuardedProtocol(asyncio.Protocol):
    """An aiohttp connection seen by its :class:`ListenerGuard`: what the deadlines need."""

    __slots__ = (
        "_guard",
        "_inner",
        "busy",
        "head_since",
        "last_data",
        "paused_since",
        "request",
        "request_since",
        "transport",
        "uid",
    )

    def __init__(self, inner: Any, guard: ListenerGuard) -> None:
        self._inner: Any = inner
        self._guard = guard
        self.transport: Any = None
        self.uid: int | None = None
        #: The last request, kept after its handler: aiohttp reads the rest of an unread body
        #: for a while (lingering), and that body is still held to the body deadlines.
        self.request: web.BaseRequest | None = None
        self.busy = False  # a handler runs
        self.request_since = 0.0
        now = _now()
        #: When the head being waited for started: the connection's start, then the first byte
        #: of each later request; None while a request is handled or the connection is idle.
        self.head_since: float | None = now
        self.last_data = now
        self.paused_since: float | None = None

    def overdue(self, now: float, limits: ConnLimits) -> str | None:
        if self.paused_since is not None and now - self.paused_since > limits.idle_timeout:
            return "send_stalled"
        request = self.request
        if request is not None and not request.content.is_eof():
            if limits.body_timeout and now - self.request_since > limits.body_timeout:
                return "body_timeout"
            # Paused reading is our own back-pressure, not the client's stall.
            if self.transport.is_reading() and now - self.last_data > limits.idle_timeout:
                return "body_stalled"
            return None
        if self.busy:
            return None  # the handler's own time (upstream, attestation) is not ours to cut
        if self.head_since is not None and now - self.head_since > limits.header_timeout:
            return "header_timeout"
        return None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if not self._guard.admit(self, transport):
            self._inner = None
            return
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        try:
            self._inner.connection_lost(exc)
        finally:
            self._guard.release(self, self.transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        self.last_data = now = _now()
        if self.head_since is None and not self.busy:
            request = self.request
            if request is None or request.content.is_eof():
                self.head_since = now  # the first byte of the next request
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is None:
            return None
        result: bool | None = self._inner.eof_received()
        return result

    def pause_writing(self) -> None:
        self.paused_since = _now()
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        self.paused_since = None
        if self._inner is not None:
            self._inner.resume_writing()


class GuardedSite(web.BaseSite):
    """A site on a TCP ``(host, port)`` or a bound socket whose connections are kept by
    ``guard``. Build the runner's server with :func:`server_options` of the same limits."""

    __slots__ = ("_guard", "_where")

    def __init__(
        self,
        runner: web.BaseRunner,
        guard: ListenerGuard,
        where: tuple[str, int] | socket.socket,
        *,
        backlog: int = 1024,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, backlog=backlog, ssl_context=ssl_context)
        self._guard = guard
        self._where = where

    @property
    def name(self) -> str:
        where = self._where
        shown = where.getsockname() if isinstance(where, socket.socket) else where
        return f"{self._guard.name} {shown}"

    async def start(self) -> None:
        await super().start()  # registers the site with its runner
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        server.request_handler = self._guard.wrap_handler(server.request_handler)
        factory = self._guard.protocol_factory(server)
        where = self._where
        tls: dict[str, Any] = {}
        if self._ssl_context is not None:
            # The guard sees a connection only after the handshake: bound the handshake by
            # the head deadline so an idle TCP connection cannot sit in it for a minute.
            tls = {
                "ssl": self._ssl_context,
                "ssl_handshake_timeout": self._guard.limits.header_timeout,
            }
        if not isinstance(where, socket.socket):
            self._server = await loop.create_server(factory, *where, backlog=self._backlog, **tls)
        elif where.family == socket.AF_UNIX:
            self._server = await loop.create_unix_server(
                factory, sock=where, backlog=self._backlog, **tls
            )
        else:
            self._server = await loop.create_server(
                factory, sock=where, backlog=self._backlog, **tls
            )
        self._guard.start()

    async def stop(self) -> None:
        await self._guard.stop()
        await super().stop()


def server_options(limits: ConnLimits) -> dict[str, Any]:
    """aiohttp server keywords for a guarded listener."""
    return {"keepalive_timeout": limits.idle_timeout}


# -- file descriptors -----------------------------------------------------------------------------


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (the soft one is often 1024, a few
    hundred held connections away); returns (soft, hard) as they are now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # pragma: no cover - a sandbox refusing it
            log.info("cannot raise the file-descriptor limit from %d: %s", soft, exc)
            return soft, hard
        log.info("file-descriptor limit raised from %d to %d", soft, hard)
        soft = hard
    return soft, hard


_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})


class FdWatch:
    """Counts open file descriptors once per ``interval`` and reports exhaustion (the check
    itself cannot open ``/proc/self/fd`` then); with asyncio's own loop also each failed accept,
    which that loop reports through its exception handler."""

    def __init__(self, registry: CollectorRegistry, *, interval: float = 1.0) -> None:
        self.metrics = connection_metrics(registry)
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._limit = 0

    def start(self) -> None:
        self._limit, _ = raise_fd_limit()
        self.metrics.fd_limit.set(self._limit)
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS:
                self.exhausted(f"accept failed: {errno.errorcode.get(exc.errno or 0, exc)}")
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
        self.check()
        self._task = loop.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()

    def check(self) -> None:
        try:
            count = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own descriptor
        except OSError as exc:
            if exc.errno in _ACCEPT_ERRNOS:
                self.metrics.open_fds.set(self._limit)
                self.exhausted("no descriptor left")
            return
        self.metrics.open_fds.set(count)

    def exhausted(self, what: str) -> None:
        self.metrics.fd_exhausted.inc()
        _log.warning(
            "fd",
            "out of file descriptors (limit %d): %s; new connections are being refused — raise "
            "the limit (ulimit -n, LimitNOFILE) or lower the listeners' max_connections",
            self._limit,
            what,
        )
