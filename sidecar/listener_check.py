"""Every listener a command opens, checked before anything binds: two settings naming the same
address, and an address this process cannot bind (in use, a privileged port, not local, a
unix socket path that cannot be created). Each problem is a ConfigError naming the key and
the fix, so an operator's mistake ends in one line and exit code 2, never a traceback.

The checks run when the configuration is loaded, before the first listener starts, so a
mistake in the last listener does not leave the first ones half started. A trial bind is not a
reservation: a port taken between the check and the real bind still fails (the command line
then reports the address, see :mod:`sidecar.cli`).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import stat
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from sidecar.errors import ConfigError
from sidecar.listen_address import ListenAddress

if TYPE_CHECKING:
    from sidecar.authz.config import AuthzConfig
    from sidecar.broker.config import BrokerConfig
    from sidecar.egress.config import EgressConfig

#: (the configuration key, the address it binds)
Listener = tuple[str, ListenAddress]

_FIX = {
    errno.EADDRINUSE: "a free port ({address} is in use by another process: stop it, or choose "
    "another port)",
    errno.EACCES: "a port >= 1024 ({address} needs root or CAP_NET_BIND_SERVICE)",
    errno.EADDRNOTAVAIL: "an address of this machine ({host} is not one: use 127.0.0.1, "
    "0.0.0.0 or a local interface's address)",
}


def _wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host == ""


def _same_socket(a: ListenAddress, b: ListenAddress) -> bool:
    if a.path is not None or b.path is not None:
        return a.path == b.path
    if a.port == 0 or a.port != b.port:
        return False  # port 0: the kernel picks a distinct port for each
    if a.host == b.host:
        return True
    # IPv6 sockets are bound v6-only (as asyncio does): 0.0.0.0 and :: do not overlap.
    same_family = (":" in a.host) == (":" in b.host)
    return same_family and (_wildcard(a.host) or _wildcard(b.host))


def check_collisions(listeners: Sequence[Listener]) -> None:
    """Two settings that bind the same address (or a wildcard host and a host on the same
    port): the later key is named, with the earlier one."""
    for j, (key, address) in enumerate(listeners):
        for other_key, other in listeners[:j]:
            if _same_socket(address, other):
                if other_key == key:  # one setting, several workers: already checked
                    continue
                raise ConfigError(
                    key, f"an address no other listener uses ({other_key} is {other})", str(address)
                )


def _bind_problem(exc: OSError, address: ListenAddress) -> str:
    fix = _FIX.get(exc.errno or 0)
    if fix is None:
        return f"a bindable address ({address}: {exc.strerror or exc})"
    return fix.format(address=address, host=address.host)


def _trial_bind_tcp(key: str, address: ListenAddress, held: list[socket.socket]) -> None:
    try:
        infos = socket.getaddrinfo(
            address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(
            key, f"a host name that resolves ({address.host}: {exc.strerror})", str(address)
        ) from None
    for family, kind, proto, _, where in infos:
        sock = socket.socket(family, kind, proto)
        held.append(sock)
        # As the servers do: a TIME_WAIT left by an earlier run does not make a port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(where)
            # Listening makes a later bind of the same port by another check fail, as the
            # real servers' would.
            sock.listen(1)
        except OSError as exc:
            raise ConfigError(key, _bind_problem(exc, address), str(address)) from None


def check_unix_socket_path(key: str, path: str) -> None:
    """The socket's directory exists and is writable, and the path is free or a stale socket
    (one nothing answers on: it is replaced when binding)."""
    directory = os.path.dirname(path) or "/"
    if not os.path.isdir(directory):
        raise ConfigError(key, f"a socket path in an existing directory (create {directory})", path)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(
            key, f"a socket path in a directory this user may write ({directory} is not)", path
        )
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(key, "a free path or a stale socket (a file is there: remove it)", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return  # stale
    finally:
        probe.close()
    raise ConfigError(key, "a socket path no running process answers on (stop it first)", path)


def check_bindable(listeners: Iterable[Listener]) -> None:
    """Bind every TCP address (port 0 excepted) and check every unix socket path, then release
    them all; the first problem raises ConfigError naming its key."""
    held: list[socket.socket] = []
    try:
        for key, address in listeners:
            if address.path is not None:
                check_unix_socket_path(key, address.path)
            elif address.port != 0:
                _trial_bind_tcp(key, address, held)
    finally:
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()


def check_listeners(listeners: Sequence[Listener]) -> None:
    check_collisions(listeners)
    check_bindable(listeners)


# -- each command's listeners ---------------------------------------------------------------


def authz_listeners(cfg: AuthzConfig, path: str = "authz") -> list[Listener]:
    """The gRPC and HTTP listeners, one per worker (port + index, or path.index)."""
    out: list[Listener] = []
    for address, key in (
        (cfg.grpc_listen, f"{path}.grpc.listen"),
        (cfg.http_listen, f"{path}.http.listen"),
    ):
        if address is not None:
            out += [(key, address.for_worker(i, cfg.workers)) for i in range(cfg.workers)]
    return out


def egress_listeners(cfg: EgressConfig, path: str = "egress") -> list[Listener]:
    out: list[Listener] = [
        (f"{path}.upstreams[{i}].listen", ListenAddress(*u.listen))
        for i, u in enumerate(cfg.upstreams)
    ]
    if cfg.forward_proxy is not None:
        out.append((f"{path}.forward_proxy.listen", ListenAddress(*cfg.forward_proxy.listen)))
    return out


def broker_listeners(cfg: BrokerConfig) -> list[Listener]:
    """The broker's HTTP and admin listeners (its unix sockets are checked where they are
    bound, with their ownership rules: see ``broker.service``)."""
    out: list[Listener] = [("listen", ListenAddress(*cfg.listen))]
    if cfg.admin_listen is not None:
        out.append(("admin.listen", ListenAddress(*cfg.admin_listen)))
    return out
