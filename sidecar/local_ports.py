"""Free loopback ports for servers a caller is about to start (the demo, tests, benchmarks).

A port handed out here is bound by another process some seconds later, so two races matter:

* A port from the kernel's ephemeral range (what binding port 0 returns) can meanwhile become
  the local port of any outgoing connection on the machine, and the server then cannot bind.
  Ports are therefore drawn *below* that range when it leaves room, and checked by binding.
* Two calls before either server binds must not return the same port. The kernel's port 0
  does not promise that; a cursor that only moves forward does (until it wraps, thousands of
  ports later). It skips one port after each it hands out, so a port taken as the base of
  ``authz.workers: 2`` (which binds it and the next) never meets the following one.
"""

from __future__ import annotations

import secrets
import socket
import threading
from pathlib import Path

_LOWEST = 10_000  # below: registered services users may run (redis 6379, 8080, 9090 …)
_MIN_SPAN = 2_000  # fewer ports than this under the ephemeral range: use the whole range
_lock = threading.Lock()
_cursor: int | None = None


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could bind ``port`` now (SO_REUSEADDR, as servers set it, so a
    TIME_WAIT left by earlier connections does not count as taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _span() -> tuple[int, int]:
    """[low, high) to draw from: under the kernel's ephemeral range when it leaves room."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32_768
    if ephemeral_low - _LOWEST >= _MIN_SPAN:
        return _LOWEST, ephemeral_low
    return _LOWEST, 65_536


def _take(count: int, host: str) -> int:
    """The first of ``count`` consecutive bindable ports at or after the cursor; moves it on."""
    global _cursor
    low, high = _span()
    with _lock:
        if _cursor is None:  # random only once: processes that draw in parallel differ
            _cursor = low + secrets.randbelow(high - low)
        elif not low <= _cursor < high:
            _cursor = low
        for _ in range(high - low):
            port = _cursor
            if port + count > high:  # wrap to the bottom: never a jump back among fresh ones
                port = low
            _cursor = port + 1
            if all(port_is_free(port + i, host) for i in range(count)):
                # One port left out after each: a port handed out as one server's may be
                # used as a base that also binds the next (``authz.workers``).
                _cursor = port + count + 1
                return port
    raise RuntimeError(f"no {count} free consecutive port(s) on {host} in {low}-{high - 1}")


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """``preferred`` if it can be bound now, else a port no earlier call returned."""
    if preferred and port_is_free(preferred, host):
        return preferred
    return _take(1, host)


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P with P and P+1 bindable now (``authz.workers: 2`` binds base + index)."""
    return _take(2, host)
