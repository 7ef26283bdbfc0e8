"""Child processes for the one-machine demo: each in its own process group, logged to a file,
waited on until ready, and torn down in reverse order — on success, error or Ctrl-C — so
nothing is left running."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """``preferred`` if it can be bound now, else a free port chosen by the kernel."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port")  # pragma: no cover - port 0 always binds


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the demo dies, even by SIGKILL (Linux only).

    Without it a killed demo (no chance to run its teardown) would orphan six servers
    holding the default ports."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux: teardown still runs
        pass


class StartupError(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Supervisor:
    workdir: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, [str(a) for a in args], self.workdir / f"{name}.log")
        merged = {**self.env, **(env or {}), "PYTHONUNBUFFERED": "1"}
        with open(child.log_path, "ab") as log:
            child.popen = subprocess.Popen(
                child.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=merged,
                start_new_session=True,  # its own group: stop() reaches its children too
                preexec_fn=_die_with_parent,
            )
        self.children.append(child)
        return child

    def wait_http(self, child: Child, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not child.alive():
                raise StartupError(f"{child.name} exited during start-up:\n{child.log_tail()}")
            try:
                with _NO_PROXY.open(url, timeout=1.0) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}"
            except OSError as exc:
                last = type(exc).__name__
            time.sleep(0.05)
        raise StartupError(f"{child.name} not ready at {url} after {timeout:.0f}s ({last}):\n"
                           f"{child.log_tail()}")  # fmt: skip

    def stop_all(self, timeout: float = 5.0) -> None:
        for child in reversed(self.children):
            _stop(child, timeout)

    def survivors(self) -> list[str]:
        out = []
        for child in self.children:
            if child.popen is None:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.popen.pid, 0)
                out.append(child.name)
        return out


def _stop(child: Child, timeout: float) -> None:
    popen = child.popen
    if popen is None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, sig)
        try:
            popen.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # The group may outlive its leader briefly (e.g. Envoy's threads are not separate
    # processes, but a shell wrapper's children would be): make sure it is gone.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.05)
