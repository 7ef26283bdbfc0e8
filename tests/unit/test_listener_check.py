"""Listener collisions are found at config load, before anything binds (issue 11.3)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from sidecar.errors import ConfigError
from sidecar.listen_address import ListenAddress
from sidecar.listener_check import check_bindable, check_collisions


def tcp(host: str, port: int) -> ListenAddress:
    return ListenAddress(host, port)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (tcp("127.0.0.1", 9000), tcp("127.0.0.1", 9000)),
        (tcp("0.0.0.0", 9000), tcp("127.0.0.1", 9000)),
        (tcp("::1", 9000), tcp("::", 9000)),
        (ListenAddress(path="/run/a.sock"), ListenAddress(path="/run/a.sock")),
    ],
    ids=["same", "wildcard-first", "wildcard-second", "unix"],
)
def test_collisions_name_both_keys(first: ListenAddress, second: ListenAddress) -> None:
    with pytest.raises(ConfigError) as info:
        check_collisions([("a.listen", first), ("b.listen", second)])
    assert info.value.key == "b.listen"
    assert f"a.listen is {first}" in str(info.value)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (tcp("127.0.0.1", 9000), tcp("127.0.0.1", 9001)),
        (tcp("127.0.0.1", 9000), tcp("127.0.0.2", 9000)),
        (tcp("127.0.0.1", 0), tcp("127.0.0.1", 0)),
        (tcp("0.0.0.0", 9000), tcp("::", 9000)),
        (ListenAddress(path="/run/a.sock"), ListenAddress(path="/run/b.sock")),
        (ListenAddress(path="/run/a.sock"), tcp("127.0.0.1", 9000)),
    ],
    ids=[
        "other-port",
        "other-host",
        "ephemeral",
        "v4-and-v6-wildcards",
        "other-path",
        "unix-and-tcp",
    ],
)
def test_distinct_addresses_pass(first: ListenAddress, second: ListenAddress) -> None:
    check_collisions([("a.listen", first), ("b.listen", second)])


def test_held_port_is_refused_and_released_ports_are_not_kept() -> None:
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            check_bindable([("x.listen", tcp("127.0.0.1", port))])
        assert info.value.key == "x.listen" and "in use" in str(info.value)
    # Checked and released: the same port binds again right after the check.
    check_bindable([("x.listen", tcp("127.0.0.1", port))])
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


def test_stale_socket_passes_and_live_socket_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    with pytest.raises(ConfigError) as info:
        check_bindable([("x.listen", ListenAddress(path=path))])
    assert "no running process answers" in str(info.value)
    live.close()  # the file stays: a stale socket, replaced when binding
    check_bindable([("x.listen", ListenAddress(path=path))])
