"""The ``loop`` engine's HTTP/2 gRPC server (sidecar.authz.grpc_h2) against real clients over
real sockets: grpcio (a complete gRPC implementation) and a raw h2 client for the protocol's
edges (PING, grpc-timeout, stream resets, flow control, GOAWAY on shutdown)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import uvloop
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from hyperframe.frame import DataFrame, Frame, HeadersFrame

from sidecar.authz.grpc_h2 import GrpcError, GrpcH2Server, Handler, parse_timeout
from sidecar.listen_address import ListenAddress
from sidecar.net_limits import ListenerGuard

PATH = "/envoy.service.auth.v3.Authorization/Check"


class ServerThread:
    """A GrpcH2Server on its own uvloop loop in a thread, as the sidecar runs it."""

    def __init__(
        self, handler: Handler, *, max_message: int = 1 << 20, guard: ListenerGuard | None = None
    ) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = GrpcH2Server(
            {PATH.encode(): handler}, max_concurrent=100, max_message=max_message, guard=guard
        )
        self.port = self.run(self.server.start(ListenAddress("127.0.0.1", 0))).port

    def run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def start(handler: Handler, **kw: Any) -> ServerThread:
        started.append(ServerThread(handler, **kw))
        return started[-1]

    yield start
    for s in started:
        s.close()


def call(port: int, payload: bytes, *, path: str = PATH, timeout: float = 5) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.unary_unary(path)
        return bytes(method(payload, timeout=timeout))


def echo(payload: bytes) -> bytes:
    return b"re:" + payload


async def slow_echo(payload: bytes) -> bytes:
    await asyncio.sleep(0.01)
    return b"re:" + payload


def test_unary_call_with_a_synchronous_and_an_asynchronous_handler(serve: Any) -> None:
    assert call(serve(echo).port, b"hello") == b"re:hello"
    assert call(serve(lambda p: slow_echo(p)).port, b"") == b"re:"


def test_many_concurrent_calls_on_one_connection(serve: Any) -> None:
    port = serve(lambda p: slow_echo(p)).port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.unary_unary(PATH)
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda i: method(b"%d" % i, timeout=10), range(300)))
    assert answers == [b"re:%d" % i for i in range(300)]


def test_unknown_method_is_unimplemented(serve: Any) -> None:
    port = serve(echo).port
    with pytest.raises(grpc.RpcError) as err:
        call(port, b"x", path="/other.Service/Check")
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_a_message_over_the_bound_is_refused(serve: Any) -> None:
    port = serve(echo, max_message=1000).port
    assert call(port, b"x" * 1000) == b"re:" + b"x" * 1000
    with pytest.raises(grpc.RpcError) as err:
        call(port, b"x" * 1001)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert call(port, b"after") == b"re:after"  # the connection is still good


def test_handler_errors_become_grpc_statuses(serve: Any) -> None:
    def failing(payload: bytes) -> bytes:
        if payload == b"grpc":
            raise GrpcError(9, "refused: präcondition")
        raise RuntimeError("bug")

    port = serve(failing).port
    with pytest.raises(grpc.RpcError) as err:
        call(port, b"grpc")
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "refused: präcondition"  # percent-encoded on the wire
    with pytest.raises(grpc.RpcError) as err:
        call(port, b"bug")
    assert err.value.code() is grpc.StatusCode.INTERNAL


def test_a_response_larger_than_the_clients_window_is_sent_whole(serve: Any) -> None:
    big = bytes(range(256)) * 1024  # 256 KiB: four times HTTP/2's default window
    assert call(serve(lambda p: big).port, b"") == big


def test_grpc_timeout_parsing() -> None:
    assert parse_timeout(b"250m") == pytest.approx(0.25)
    assert parse_timeout(b"2S") == 2.0
    assert parse_timeout(b"1H") == 3600.0
    assert parse_timeout(b"123456789m") is None  # more than 8 digits
    assert parse_timeout(b"5x") is None


class RawClient:
    """An h2 client on a blocking socket: to send what grpcio never would."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def request(
        self, payload: bytes, *extra: tuple[str, str], end: bool = True, flush: bool = True
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", PATH),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            *extra,
        ]
        self.conn.send_headers(sid, headers)
        message = b"\x00" + len(payload).to_bytes(4, "big") + payload
        self.conn.send_data(sid, message, end_stream=end)
        if flush:
            self.flush()
        return sid

    def events(self, until: Callable[[Any], bool]) -> list[Any]:
        seen: list[Any] = []
        while not any(until(e) for e in seen):
            data = self.sock.recv(65536)
            if not data:
                break
            seen += self.conn.receive_data(data)
            self.flush()
        return seen


@pytest.fixture
def raw() -> Iterator[Callable[[int], RawClient]]:
    clients: list[RawClient] = []

    def connect(port: int) -> RawClient:
        clients.append(RawClient(port))
        return clients[-1]

    yield connect
    for c in clients:
        c.sock.close()


def test_ping_is_answered(serve: Any, raw: Any) -> None:
    client = raw(serve(echo).port)
    client.conn.ping(b"12345678")
    client.flush()
    acks = [e for e in client.events(lambda e: isinstance(e, PingAckReceived))]
    assert any(isinstance(e, PingAckReceived) and e.ping_data == b"12345678" for e in acks)


class Hang:
    """A handler waiting on I/O that never comes; records that it started and was cancelled."""

    def __init__(self) -> None:
        self.started, self.cancelled = threading.Event(), threading.Event()

    def __call__(self, payload: bytes) -> Any:
        return self._wait()

    async def _wait(self) -> bytes:
        self.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b""


def test_grpc_timeout_bounds_a_handler_waiting_on_io(serve: Any, raw: Any) -> None:
    hang = Hang()
    client = raw(serve(hang).port)
    sid = client.request(b"x", ("grpc-timeout", "200m"))
    events = client.events(lambda e: isinstance(e, StreamEnded) and e.stream_id == sid)
    answer = next(e for e in events if isinstance(e, ResponseReceived))
    headers: dict[Any, Any] = dict(answer.headers)
    assert headers["grpc-status"] == "4"  # DEADLINE_EXCEEDED, as a trailers-only answer
    assert hang.cancelled.wait(2)


def test_a_call_reset_by_the_client_is_cancelled(serve: Any, raw: Any) -> None:
    hang = Hang()
    client = raw(serve(hang).port)
    sid = client.request(b"x")
    assert hang.started.wait(2)
    client.conn.reset_stream(sid)
    client.flush()
    assert hang.cancelled.wait(2)
    # The connection serves the next call.
    sid = client.request(b"x", ("grpc-timeout", "50m"))
    events = client.events(lambda e: isinstance(e, StreamEnded) and e.stream_id == sid)
    assert not any(isinstance(e, StreamReset) for e in events)


def test_shutdown_sends_goaway_and_lets_calls_in_flight_finish(serve: Any, raw: Any) -> None:
    release = threading.Event()

    async def waits(payload: bytes) -> bytes:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return b"done"

    server = serve(lambda p: waits(p))
    client = raw(server.port)
    sid = client.request(b"x")
    client.events(lambda e: True)  # the server's SETTINGS: the call is open
    stopping = asyncio.run_coroutine_threadsafe(server.server.stop(5), server.loop)
    events = client.events(lambda e: isinstance(e, ConnectionTerminated))
    goaway = next(e for e in events if isinstance(e, ConnectionTerminated))
    assert goaway.error_code == 0 and goaway.last_stream_id == sid
    release.set()
    stopping.result(5)
    # h2's client state machine ignores everything after GOAWAY: read the frames ourselves.
    rest = b""
    while chunk := client.sock.recv(65536):
        rest += chunk
    frames = []
    while rest:
        frame, length = Frame.parse_frame_header(memoryview(rest[:9]))
        frame.parse_body(memoryview(rest[9 : 9 + length]))
        frames.append(frame)
        rest = rest[9 + length :]
    data = b"".join(f.data for f in frames if isinstance(f, DataFrame) and f.stream_id == sid)
    assert data == b"\x00\x00\x00\x00\x04done"
    last = [f for f in frames if isinstance(f, HeadersFrame) and f.stream_id == sid][-1]
    assert "END_STREAM" in last.flags  # the trailers closed the call


def test_a_call_reset_in_the_same_read_as_its_request_spares_the_connection(
    serve: Any, raw: Any
) -> None:
    # Envoy resets a call whose deadline passed; under load the reset and the next calls can
    # arrive in the same read as the request itself. Answering the reset call used to raise
    # out of data_received, and the event loop then dropped the whole connection.
    client = raw(serve(echo).port)
    first = client.request(b"late", flush=False)
    client.conn.reset_stream(first)
    second = client.request(b"next", flush=False)
    client.flush()  # one write: request, reset, next request
    events = client.events(lambda e: isinstance(e, StreamEnded) and e.stream_id == second)
    data = b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == second)
    assert data == b"\x00\x00\x00\x00\x07re:next"
    assert not any(isinstance(e, ConnectionTerminated) for e in events)
