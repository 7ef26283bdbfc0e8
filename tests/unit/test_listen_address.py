"""Listener addresses: TCP or unix socket, each worker's own address, 0600 sockets that never
replace a file that is not a socket."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.authz.config import parse_authz_config
from sidecar.errors import ConfigError
from sidecar.listen_address import (
    ListenAddress,
    bind_unix,
    check_worker_addresses,
    parse_listen_address,
)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="wis-", dir="/tmp") as tmp:
        yield Path(tmp)


def test_tcp_and_unix_addresses_parse() -> None:
    assert parse_listen_address("127.0.0.1:9191", "k") == ListenAddress("127.0.0.1", 9191)
    assert parse_listen_address("[::1]:0", "k") == ListenAddress("::1", 0)
    assert parse_listen_address("unix:/run/a.sock", "k") == ListenAddress(path="/run/a.sock")
    assert ListenAddress("::1", 5).grpc_target() == "[::1]:5"
    assert ListenAddress(path="/run/a.sock").grpc_target() == "unix:/run/a.sock"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("unix:run/a.sock", "unix:/absolute/path"),
        ("unix:/" + "a" * 107, "at most 107 bytes"),
        ("localhost", "host:port"),
        (9191, "host:port"),
    ],
)
def test_bad_addresses_name_the_key(value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_listen_address(value, "authz.grpc.listen")
    assert str(info.value).startswith("authz.grpc.listen: expected")
    assert expected in str(info.value)


def test_each_worker_gets_its_own_address() -> None:
    tcp, unix = ListenAddress("127.0.0.1", 9300), ListenAddress(path="/run/a.sock")
    assert [tcp.for_worker(i, 3).port for i in range(3)] == [9300, 9301, 9302]
    assert [unix.for_worker(i, 2).path for i in range(2)] == ["/run/a.sock.0", "/run/a.sock.1"]
    assert tcp.for_worker(0, 1) == tcp and unix.for_worker(0, 1) == unix  # one worker: as is
    assert ListenAddress("127.0.0.1", 0).for_worker(1, 2).port == 0  # ephemeral each
    with pytest.raises(ConfigError, match="a port <= 65534"):
        check_worker_addresses(ListenAddress("127.0.0.1", 65535), 2, "authz.grpc.listen")
    with pytest.raises(ConfigError, match="at most 107 bytes"):
        check_worker_addresses(ListenAddress(path="/" + "a" * 105), 10, "authz.grpc.listen")


def test_unix_socket_is_0600_and_replaces_only_a_stale_socket(short_dir: Path) -> None:
    path = str(short_dir / "a.sock")
    os.umask(old := os.umask(0o000))  # whatever the process umask, the socket is 0600
    try:
        first = bind_unix(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        first.close()  # a stale socket from an earlier run: replaced
        second = bind_unix(path)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
        second.close()
    finally:
        os.umask(old)
    regular = short_dir / "not-a-socket"
    regular.write_text("keep me")
    with pytest.raises(OSError, match="not a unix socket"):
        bind_unix(str(regular))
    assert regular.read_text() == "keep me"


def test_authz_listeners_take_unix_sockets() -> None:
    cfg = parse_authz_config(
        {
            "audience": "spiffe://demo.local/ns/shop/sa/orders",
            "issuers": [{"issuer": "https://i.example", "jwks_uri": "https://i.example/k"}],
            "grpc": {"listen": "unix:/run/wis/grpc.sock"},
            "http": {"listen": "127.0.0.1:0"},
        }
    )
    assert cfg.grpc_listen == ListenAddress(path="/run/wis/grpc.sock")
    assert cfg.http_listen == ListenAddress("127.0.0.1", 0)
