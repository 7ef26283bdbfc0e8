"""A minimal gRPC server for unary calls, HTTP/2 by the sans-IO ``h2`` library, on the event loop.

Envoy is the only client and ext_authz ``Check`` the only method, so the protocol surface is
small: a HEADERS frame, DATA carrying one length-prefixed message, and our answer as HEADERS,
DATA and trailers with ``grpc-status``. ``h2`` does the HTTP/2 state machine (SETTINGS, PING,
flow control, GOAWAY, RST_STREAM, the concurrent-stream limit, HPACK). A handler that decides
without I/O answers within the same ``data_received`` call: no task, no thread hop.

Bounds: ``max_concurrent`` open streams per connection (more is a connection error), a message
of at most ``max_message`` bytes (more: RESOURCE_EXHAUSTED), the header list size, and the
caller's ``grpc-timeout`` for a handler that has to wait on I/O (then DEADLINE_EXCEEDED).
With a :class:`~sidecar.net_limits.ListenerGuard` (``authz.grpc.connections``) also the number of
connections and their deadlines: the preface and first request within ``header_timeout``, each
request's message within ``body_timeout`` of its HEADERS, and ``idle_timeout`` for a connection
with no stream open or whose answers the peer stops reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame, SettingsFrame

from sidecar.errors import SidecarError
from sidecar.listen_address import ListenAddress, bind_unix
from sidecar.net_limits import ConnLimits, ListenerGuard

log = logging.getLogger(__name__)

#: A handler gets one serialized request message and returns the serialized response, or an
#: awaitable of it when it needs I/O. It raises :class:`GrpcError` for a non-OK status.
Handler = Callable[[bytes], "bytes | Awaitable[bytes]"]

# gRPC status codes used here (grpc/doc/statuscodes.md).
OK, CANCELLED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED = 0, 1, 4, 8
UNIMPLEMENTED, INTERNAL = 12, 13

_RESPONSE_HEADERS = ((b":status", b"200"), (b"content-type", b"application/grpc"))
_OK_TRAILERS = ((b"grpc-status", b"0"),)
_TIMEOUT = re.compile(rb"(\d{1,8})([HMSmun])")
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
MAX_HEADER_LIST = 16 * 1024
_now = time.monotonic


class GrpcError(SidecarError):
    """A handler's refusal with a gRPC ``status`` (an int: grpc-status), sent trailers-only."""

    code = "grpc_error"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_timeout(value: bytes) -> float | None:
    """``grpc-timeout`` (gRPC over HTTP/2: up to 8 digits and a unit) in seconds."""
    match = _TIMEOUT.fullmatch(value)
    if match is None:
        return None
    return int(match.group(1)) * _UNITS[match.group(2)]


def refusal(reason: str) -> bytes:
    """Sent to a connection over the cap before it is closed: our SETTINGS (the server preface)
    and GOAWAY ENHANCE_YOUR_CALM for stream 0, so the peer knows no request of it was processed."""
    frame = GoAwayFrame(0)
    frame.last_stream_id = 0
    frame.error_code = ErrorCodes.ENHANCE_YOUR_CALM
    frame.additional_data = f"too many connections ({reason})".encode()
    return SettingsFrame(0).serialize() + frame.serialize()


class _Call:
    __slots__ = ("body", "expired", "handler", "pending", "since", "task", "timeout", "timer")

    def __init__(self, handler: Handler, timeout: float | None, since: float) -> None:
        self.handler = handler
        self.since = since  # when its HEADERS arrived
        self.body = bytearray()
        self.timeout = timeout
        self.task: asyncio.Future[bytes] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.expired = False
        self.pending = b""  # response DATA still waiting for flow-control window


class GrpcH2Protocol(asyncio.Protocol):
    def __init__(
        self,
        handlers: dict[bytes, Handler],
        *,
        max_concurrent: int,
        max_message: int,
        live: set[GrpcH2Protocol] | None = None,
        guard: ListenerGuard | None = None,
    ) -> None:
        self.handlers = handlers
        self.guard = guard
        self.uid: int | None = None  # for the guard: TCP and Envoy, no per-uid cap
        self.opened = _now()
        #: When the last stream opened or the last answer needing I/O went out; None until the
        #: first request (then the header deadline applies).
        self.last_call: float | None = None
        self.paused_since: float | None = None
        self.max_message = max_message
        self.live = live if live is not None else set()
        # Header validation off: it is most of h2's cost per call (measured), and nothing here
        # trusts these headers: the request under decision is inside the protobuf message;
        # only :method, :path, content-type and grpc-timeout are read, each checked below.
        config = H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.conn = H2Connection(config=config)
        self.conn.local_settings.update(
            {
                SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            }
        )
        self.calls: dict[int, _Call] = {}
        self._waiting: dict[int, _Call] = {}  # answers held back by flow control
        self.last_stream: int | None = None  # set once GOAWAY was sent
        self.transport: asyncio.Transport | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        if self.guard is not None and not self.guard.admit(self, transport):
            return  # refused and closed by the guard
        self.transport = cast(asyncio.Transport, transport)
        self.live.add(self)
        self.conn.initiate_connection()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.live.discard(self)
        for call in self.calls.values():
            if call.task is not None:
                call.task.cancel()
        self.calls.clear()
        transport, self.transport = self.transport, None
        if self.guard is not None and transport is not None:
            self.guard.release(self, transport)

    def pause_writing(self) -> None:
        # The peer does not read our answers: stop reading its requests until it does.
        self.paused_since = _now()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused_since = None
        if self.transport is not None:
            self.transport.resume_reading()

    # -- deadlines (called by the guard's sweep) -------------------------------------------

    def overdue(self, now: float, limits: ConnLimits) -> str | None:
        if self.paused_since is not None and now - self.paused_since > limits.idle_timeout:
            return "send_stalled"
        if self.last_call is None:
            # Not even a preface and one HEADERS yet: a silent or slow-loris connection.
            return "header_timeout" if now - self.opened > limits.header_timeout else None
        for call in self._waiting.values():  # answers the peer gives no window for
            if now - call.since > limits.idle_timeout:
                return "send_stalled"
        if limits.body_timeout:
            for call in self.calls.values():
                if call.task is None and now - call.since > limits.body_timeout:
                    return "body_timeout"  # a request whose message never ends
        if not self.calls and not self._waiting and now - self.last_call > limits.idle_timeout:
            return "idle_timeout"
        return None

    def abort(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.calls or self._waiting or self.paused_since is not None:
            transport.abort()
            return
        # Nothing in flight: GOAWAY first, so a stream crossing it is known to the peer as
        # unprocessed (and retried) rather than failed.
        self.goaway()
        transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as exc:
            # h2 has queued a GOAWAY with the error code: send it and hang up.
            log.info("ext_authz gRPC: HTTP/2 protocol error from peer: %s", type(exc).__name__)
            self._flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            try:
                if isinstance(event, DataReceived):
                    self._data(event)
                elif isinstance(event, RequestReceived):
                    self._request(event)
                elif isinstance(event, StreamEnded):
                    self._ended(event.stream_id)
                elif isinstance(event, WindowUpdated):
                    self._window(event.stream_id)
                elif isinstance(event, StreamReset):
                    self._drop(event.stream_id)
                elif isinstance(event, ConnectionTerminated):
                    self._flush()
                    if self.transport is not None:
                        self.transport.close()
                    return
            except ProtocolError:
                # One read can carry a request and its reset (Envoy's deadline passed): the
                # stream is gone by the time we answer it. Only that stream is affected.
                self.calls.pop(getattr(event, "stream_id", 0), None)
        self._flush()

    # -- events ---------------------------------------------------------------------------

    def _request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        self.last_call = now = _now()
        if self.last_stream is not None and sid > self.last_stream:
            # Opened after our GOAWAY: refused, the peer may retry it elsewhere.
            self.conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        method = path = ctype = timeout = None
        for name, value in event.headers:
            if name == b":path":
                path = value
            elif name == b":method":
                method = value
            elif name == b"content-type":
                ctype = value
            elif name == b"grpc-timeout":
                timeout = value
            elif name == b"grpc-encoding" and value != b"identity":
                self._trailers_only(sid, UNIMPLEMENTED, "compressed messages are not accepted")
                return
        if method != b"POST" or ctype is None or not ctype.startswith(b"application/grpc"):
            # Not gRPC at all: a plain HTTP answer (gRPC over HTTP/2 asks for 415).
            self.conn.send_headers(sid, ((b":status", b"415"),), end_stream=True)
            self._reset_rest(sid)
            return
        handler = self.handlers.get(path) if path is not None else None
        if handler is None:
            self._trailers_only(sid, UNIMPLEMENTED, "unknown method")
            return
        self.calls[sid] = _Call(
            handler, parse_timeout(timeout) if timeout is not None else None, now
        )
        if event.stream_ended is not None:
            self._ended(sid)

    def _data(self, event: DataReceived) -> None:
        sid = event.stream_id
        # Give the window back at once: the size bound below is what limits memory.
        self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
        call = self.calls.get(sid)
        if call is None or call.task is not None:
            return
        if len(call.body) + len(event.data) > self.max_message + 5:
            del self.calls[sid]
            self._trailers_only(sid, RESOURCE_EXHAUSTED, "message larger than the bound")
            return
        call.body += event.data

    def _ended(self, sid: int) -> None:
        call = self.calls.get(sid)
        if call is None or call.task is not None:
            return
        body = call.body
        if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
            del self.calls[sid]
            code = UNIMPLEMENTED if body[:1] == b"\x01" else INTERNAL
            self._trailers_only(sid, code, "expected exactly one uncompressed message")
            return
        try:
            result = call.handler(bytes(body[5:]))
        except GrpcError as err:
            del self.calls[sid]
            self._trailers_only(sid, err.status, err.message)
            return
        except Exception:
            del self.calls[sid]
            log.exception("ext_authz gRPC handler failed")
            self._trailers_only(sid, INTERNAL, "handler failed")
            return
        if isinstance(result, bytes):
            del self.calls[sid]
            self._respond(sid, call, result)
            return
        # The handler waits on I/O: answer when it is done, or at the caller's deadline.
        call.task = task = asyncio.ensure_future(result)
        if call.timeout is not None:
            call.timer = asyncio.get_running_loop().call_later(call.timeout, self._expire, call)
        task.add_done_callback(functools.partial(self._done, sid, call))

    @staticmethod
    def _expire(call: _Call) -> None:
        call.expired = True
        if call.task is not None:
            call.task.cancel()

    def _done(self, sid: int, call: _Call, task: asyncio.Future[bytes]) -> None:
        self.last_call = _now()
        if call.timer is not None:
            call.timer.cancel()
        code, message, answer = OK, "", b""
        if task.cancelled():
            code, message = (
                (DEADLINE_EXCEEDED, "deadline exceeded")
                if call.expired
                else (CANCELLED, "cancelled")
            )
        elif (exc := task.exception()) is not None:
            if isinstance(exc, GrpcError):
                code, message = exc.status, exc.message
            else:
                log.error("ext_authz gRPC handler failed", exc_info=exc)
                code, message = INTERNAL, "handler failed"
        else:
            answer = task.result()
        if self.calls.pop(sid, None) is None or self.transport is None:
            return  # reset by the peer, or the connection is gone meanwhile
        try:
            if code == OK:
                self._respond(sid, call, answer)
            else:
                self._trailers_only(sid, code, message)
        except ProtocolError:
            pass  # the connection failed meanwhile: nothing to answer on
        self._flush()

    def _window(self, sid: int) -> None:
        targets = [sid] if sid else [s for s, c in self._waiting.items() if c.pending]
        for s in targets:
            call = self._waiting.get(s)
            if call is not None:
                self._send_pending(s, call)

    def _drop(self, sid: int) -> None:
        call = self.calls.pop(sid, None)
        self._waiting.pop(sid, None)
        if call is not None and call.task is not None:
            call.task.cancel()

    # -- answers --------------------------------------------------------------------------

    def _respond(self, sid: int, call: _Call, message: bytes) -> None:
        self.conn.send_headers(sid, _RESPONSE_HEADERS)
        call.pending = b"\x00" + len(message).to_bytes(4, "big") + message
        self._send_pending(sid, call)

    def _send_pending(self, sid: int, call: _Call) -> None:
        conn = self.conn
        try:
            while call.pending:
                size = min(
                    conn.local_flow_control_window(sid),
                    conn.max_outbound_frame_size,
                    len(call.pending),
                )
                if size <= 0:
                    self._waiting[sid] = call  # resumed by a WINDOW_UPDATE
                    return
                conn.send_data(sid, call.pending[:size])
                call.pending = call.pending[size:]
            conn.send_headers(sid, _OK_TRAILERS, end_stream=True)
        except ProtocolError:
            pass  # the stream was reset meanwhile: nothing to answer
        self._waiting.pop(sid, None)

    def _trailers_only(self, sid: int, code: int, message: str) -> None:
        headers = (
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", str(code).encode()),
            (b"grpc-message", _percent_encode(message)),
        )
        try:
            self.conn.send_headers(sid, headers, end_stream=True)
        except ProtocolError:
            return
        self._reset_rest(sid)

    def _reset_rest(self, sid: int) -> None:
        # We answered before the request ended: refuse the rest of its body (RFC 9113 §8.1).
        stream = self.conn.streams.get(sid)
        if stream is not None and not stream.closed:
            with contextlib.suppress(ProtocolError):
                self.conn.reset_stream(sid, ErrorCodes.NO_ERROR)

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def goaway(self) -> None:
        """Tell the peer to open no more streams here (shutdown); calls in flight go on.
        Written by hand: h2's ``close_connection`` would refuse to answer them."""
        if self.transport is None or self.last_stream is not None:
            return
        self.last_stream = self.conn.highest_inbound_stream_id
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.last_stream
        frame.error_code = ErrorCodes.NO_ERROR
        self._flush()
        self.transport.write(frame.serialize())


def _percent_encode(message: str) -> bytes:
    """``grpc-message``: printable ASCII except ``%`` as is, everything else percent-encoded."""
    out = bytearray()
    for byte in message.encode():
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


class GrpcH2Server:
    """Listens on a TCP port or a unix socket (a :class:`ListenAddress`); with ``guard``, its
    connections are capped and held to its deadlines (build it with :func:`refusal`)."""

    def __init__(
        self,
        handlers: dict[bytes, Handler],
        *,
        max_concurrent: int,
        max_message: int,
        guard: ListenerGuard | None = None,
    ) -> None:
        self.handlers = handlers
        self.guard = guard
        self.max_concurrent = max_concurrent
        self.max_message = max_message
        self.server: asyncio.Server | None = None
        self.protocols: set[GrpcH2Protocol] = set()

    def _protocol(self) -> GrpcH2Protocol:
        return GrpcH2Protocol(
            self.handlers,
            max_concurrent=self.max_concurrent,
            max_message=self.max_message,
            live=self.protocols,
            guard=self.guard,
        )

    async def start(self, address: ListenAddress, *, backlog: int = 1024) -> ListenAddress:
        """Listen on ``address``; returns it with the real port when 0 was asked for."""
        loop = asyncio.get_running_loop()
        if address.path is not None:
            sock = bind_unix(address.path, backlog)  # mode 0600
            self.server = await loop.create_unix_server(self._protocol, sock=sock)
        else:
            self.server = await loop.create_server(
                self._protocol, address.host, address.port, backlog=backlog
            )
            address = ListenAddress(address.host, int(self.server.sockets[0].getsockname()[1]))
        if self.guard is not None:
            self.guard.start()
        return address

    async def stop(self, grace: float) -> None:
        """Stop accepting, tell every peer GOAWAY, let calls in flight end within ``grace``."""
        if self.server is None:
            return
        if self.guard is not None:
            await self.guard.stop()
        self.server.close()
        for proto in list(self.protocols):
            proto.goaway()
        deadline = asyncio.get_running_loop().time() + grace
        while any(p.calls for p in self.protocols):
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.02)
        for proto in list(self.protocols):
            if proto.transport is not None:
                proto.transport.close()
        await self.server.wait_closed()
