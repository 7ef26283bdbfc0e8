"""sidecar.local_ports: ports for servers started a moment later are unique, bindable, and out
of the kernel's ephemeral range (where outgoing connections take their local ports)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar import local_ports
from sidecar.local_ports import free_port, free_port_pair, port_is_free


def _ephemeral() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_ports_are_never_handed_out_twice_before_they_are_bound() -> None:
    # Nothing binds them in between: the kernel's port 0 may well repeat itself here.
    ports = [free_port() for _ in range(300)] + [free_port_pair() for _ in range(50)]
    pairs = ports[300:]
    taken = ports[:300] + pairs + [p + 1 for p in pairs]
    assert len(set(taken)) == len(taken)
    assert all(port_is_free(p) for p in taken)
    # Nor the neighbour of a port handed out: a workers base also binds base + 1.
    assert not {p + 1 for p in ports[:300]} & set(taken)


def test_ports_come_from_below_the_ephemeral_range() -> None:
    low, _ = _ephemeral()
    if low - 10_000 < 2_000:
        pytest.skip(f"ephemeral range starts at {low}: no room below it on this machine")
    assert all(10_000 <= free_port() < low for _ in range(100))
    assert all((p := free_port_pair()) >= 10_000 and p + 1 < low for _ in range(20))


@pytest.fixture
def held() -> Iterator[socket.socket]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
        s.listen()
        yield s


def test_a_bound_port_is_skipped(held: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    port = held.getsockname()[1]
    assert not port_is_free(port)
    monkeypatch.setattr(local_ports, "_cursor", port)
    assert free_port() != port
    monkeypatch.setattr(local_ports, "_cursor", port - 1)
    pair = free_port_pair()
    assert port not in (pair, pair + 1)


def test_preferred_port_is_kept_only_when_free(held: socket.socket) -> None:
    port = held.getsockname()[1]
    assert free_port(preferred=port) != port
    spare = free_port()
    assert free_port(preferred=spare) == spare


def test_the_cursor_wraps_to_the_bottom_of_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    low, high = local_ports._span()
    monkeypatch.setattr(local_ports, "_cursor", high - 1)
    assert free_port_pair() < high - 1  # no room for two at the top
    wrapped = free_port_pair()
    assert low <= wrapped < low + 1000  # from the bottom on, not a random restart
