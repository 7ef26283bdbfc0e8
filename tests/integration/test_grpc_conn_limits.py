"""Connection limits on the ``loop`` engine's gRPC port (``authz.grpc.connections``), with a real
GrpcH2Server on loopback and raw sockets and h2 clients:

* a connection that sends nothing, or only the HTTP/2 preface, is closed at ``header_timeout``;
* a connection idle after a completed call gets GOAWAY and is closed at ``idle_timeout``;
* a connection over ``max_connections`` gets GOAWAY ENHANCE_YOUR_CALM and is closed, while a
  connection already open still gets its calls answered.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, DataReceived, StreamEnded
from prometheus_client import CollectorRegistry

from sidecar.authz.grpc_h2 import refusal
from sidecar.net_limits import ConnLimits, ListenerGuard
from tests.integration.test_grpc_h2 import RawClient, ServerThread, echo

HEADER_TIMEOUT = 0.5
IDLE_TIMEOUT = 1.0
#: Sweep granularity (a quarter of the shortest timeout) plus scheduling on a loaded machine.
SLACK = 1.5
LISTENER = "authz_grpc"

Start = Callable[..., tuple[ServerThread, CollectorRegistry]]


@pytest.fixture
def guarded() -> Iterator[Start]:
    started: list[ServerThread] = []

    def start(**limits: Any) -> tuple[ServerThread, CollectorRegistry]:
        registry = CollectorRegistry()
        chosen = {
            "max_connections": 32,
            "header_timeout": HEADER_TIMEOUT,
            "body_timeout": HEADER_TIMEOUT,
            "idle_timeout": IDLE_TIMEOUT,
            **limits,
        }
        guard = ListenerGuard(LISTENER, ConnLimits(**chosen), registry, refusal=refusal)
        started.append(ServerThread(echo, guard=guard))
        return started[-1], registry

    yield start
    for server in started:
        server.close()


def closed_after(sock: socket.socket, since: float) -> float:
    """Seconds from ``since`` until the server closed ``sock`` (reads and drops what comes)."""
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - since


def answered(client: RawClient, payload: bytes) -> bytes:
    sid = client.request(payload)
    events = client.events(lambda e: isinstance(e, StreamEnded) and e.stream_id == sid)
    data = b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == sid)
    return data[5:]  # the gRPC message prefix


def counted(registry: CollectorRegistry, name: str, reason: str) -> float:
    return registry.get_sample_value(name, {"listener": LISTENER, "reason": reason}) or 0.0


def test_a_connection_without_a_request_is_closed_at_header_timeout(guarded: Start) -> None:
    server, registry = guarded()
    since = time.monotonic()
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    preface_only = RawClient(server.port)  # the preface and SETTINGS, then no HEADERS
    try:
        for sock in (silent, preface_only.sock):
            elapsed = closed_after(sock, since)
            assert HEADER_TIMEOUT <= elapsed < HEADER_TIMEOUT + SLACK
    finally:
        silent.close()
        preface_only.sock.close()
    timed_out = "sidecar_connections_timed_out_total"
    assert counted(registry, timed_out, "header_timeout") == 2


def test_a_connection_idle_after_a_call_is_closed_at_idle_timeout(guarded: Start) -> None:
    server, registry = guarded()
    client = RawClient(server.port)
    try:
        assert answered(client, b"x") == b"re:x"
        since = time.monotonic()
        events = client.events(lambda e: isinstance(e, ConnectionTerminated))
        [goaway] = [e for e in events if isinstance(e, ConnectionTerminated)]
        # A graceful close: nothing was in flight, and the peer learns which streams were seen.
        assert goaway.error_code == ErrorCodes.NO_ERROR and goaway.last_stream_id == 1
        elapsed = closed_after(client.sock, since)
    finally:
        client.sock.close()
    # The server's clock starts at the request, a little before ours.
    assert IDLE_TIMEOUT - 0.1 <= elapsed < IDLE_TIMEOUT + SLACK
    assert counted(registry, "sidecar_connections_timed_out_total", "idle_timeout") == 1


def test_connections_over_the_cap_are_refused_while_open_ones_are_answered(
    guarded: Start,
) -> None:
    server, registry = guarded(
        max_connections=3, header_timeout=30.0, body_timeout=30.0, idle_timeout=30.0
    )
    first = RawClient(server.port)
    held = [RawClient(server.port) for _ in range(2)]
    try:
        assert answered(first, b"a") == b"re:a"
        for client in held:
            client.events(lambda e: True)  # the server's SETTINGS: admitted
        for _ in range(5):
            over = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            # Read only (a client preface crossing our close could turn it into a reset).
            peer = H2Connection(H2Configuration(client_side=True))
            peer.initiate_connection()
            received = b""
            with over:
                over.settimeout(10)
                while chunk := over.recv(65536):
                    received += chunk
            [goaway] = [
                e for e in peer.receive_data(received) if isinstance(e, ConnectionTerminated)
            ]
            assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
            assert goaway.last_stream_id == 0
            assert answered(first, b"b") == b"re:b"  # the open connection still works
        rejected = "sidecar_connections_rejected_total"
        assert counted(registry, rejected, "max_connections") == 5
        assert registry.get_sample_value("sidecar_connections_open", {"listener": LISTENER}) == 3
        # A slot given back is taken again.
        held.pop().sock.close()
        deadline = time.monotonic() + 5
        while registry.get_sample_value("sidecar_connections_open", {"listener": LISTENER}) != 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        held.append(RawClient(server.port))
        assert answered(held[-1], b"c") == b"re:c"
    finally:
        first.sock.close()
        for client in held:
            client.sock.close()
