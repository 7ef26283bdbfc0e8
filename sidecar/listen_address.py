"""Where a listener binds: a TCP ``host:port`` or a unix socket ``unix:/path``.

Any engine (grpcio, aiohttp, an asyncio server) can bind either kind from a
:class:`ListenAddress`; :meth:`ListenAddress.for_worker` derives each worker process's own
address from the configured one (port + index, or path + ``.index``), and ``sidecar
envoy-config`` lists the same addresses as the ext_authz cluster's endpoints.

Unix sockets are created mode 0600 (only the sidecar's user, i.e. Envoy running as the same
user, may connect): the umask is tightened while binding so the socket never exists with wider
permissions, then the mode is set explicitly.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sidecar.config_util import parse_listen
from sidecar.errors import ConfigError

UNIX_PREFIX = "unix:"
#: sun_path holds 108 bytes on Linux, including the terminating NUL.
MAX_UNIX_PATH = 107
SOCKET_MODE = 0o600


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str = ""
    port: int = 0
    path: str | None = None  # a unix socket when set (host and port unused)

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def for_worker(self, index: int, count: int) -> ListenAddress:
        """Worker ``index`` of ``count``: the address itself for a single worker; else port +
        index (0 stays 0: an ephemeral port each) or the socket path + ``.index``."""
        if count == 1:
            return self
        if self.path is not None:
            return ListenAddress(path=f"{self.path}.{index}")
        return ListenAddress(self.host, self.port + index if self.port else 0)

    def grpc_target(self) -> str:
        """The address in grpcio's ``add_insecure_port`` syntax."""
        if self.path is not None:
            return UNIX_PREFIX + self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.grpc_target()


def parse_listen_address(value: Any, key: str) -> ListenAddress:
    """``host:port`` (``[::1]:port`` for IPv6) or ``unix:/absolute/path``."""
    if isinstance(value, str) and value.startswith(UNIX_PREFIX):
        path = value[len(UNIX_PREFIX) :]
        if not path.startswith("/") or "\x00" in path:
            raise ConfigError(key, "unix:/absolute/path", value)
        check_unix_path(path, key)
        return ListenAddress(path=path)
    host, port = parse_listen(value, key)
    return ListenAddress(host, port)


def check_unix_path(path: str, key: str) -> None:
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ConfigError(key, f"a unix socket path of at most {MAX_UNIX_PATH} bytes", path)


def check_worker_addresses(address: ListenAddress, count: int, key: str) -> None:
    """Every worker's derived address must be valid too (port range, socket path length)."""
    last = address.for_worker(count - 1, count)
    if last.path is not None:
        check_unix_path(last.path, key)
    elif last.port > 65535:
        raise ConfigError(key, f"a port <= {65536 - count} so that {count} workers fit", address)


# -- binding unix sockets --------------------------------------------------------------------


def remove_stale_socket(path: str) -> None:
    """Unlink a socket left by a previous run; refuse to replace anything that is not one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a unix socket; not replacing it")
    os.unlink(path)


@contextlib.contextmanager
def socket_umask() -> Iterator[None]:
    """Sockets bound inside are created 0600 (the umask is process-wide: start-up only)."""
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def bind_unix(path: str, backlog: int = 1024) -> socket.socket:
    """A listening, non-blocking unix stream socket at ``path``, mode 0600."""
    remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with socket_umask():
            sock.bind(path)
        os.chmod(path, SOCKET_MODE)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_tcp(host: str, port: int, key: str) -> socket.socket:
    """A bound, non-blocking TCP socket at ``host:port`` (the first address the name resolves
    to), so the caller knows the port before serving (port 0: an ephemeral one). The server
    listens on it later. A failure is a ConfigError naming ``key``."""
    where = f"{host}:{port}"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (OSError, IndexError) as exc:
        raise ConfigError(key, f"a host:port that resolves ({exc})", where) from None
    sock = socket.socket(family, kind, proto)
    try:
        # As asyncio's create_server: rebinding right after a restart works, and an IPv6
        # wildcard does not also take the IPv4 port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ConfigError(key, f"an address free to bind ({exc.strerror})", where) from None
    sock.setblocking(False)
    return sock


def unlink_socket(address: ListenAddress | None) -> None:
    if address is not None and address.path is not None:
        with contextlib.suppress(OSError):
            remove_stale_socket(address.path)
