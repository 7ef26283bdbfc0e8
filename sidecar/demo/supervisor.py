"""Child processes for the one-machine demo: each in its own process group, logged to a file,
waited on until ready, and torn down in reverse order — on success, error or Ctrl-C — so
nothing is left running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from sidecar import process_group

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Stopped(Exception):
    """SIGTERM or SIGHUP: unwind through the same teardown as Ctrl-C."""


_deferring = False
_pending: int | None = None


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _deferring:
        _pending = signum  # raised once the spawn is complete
        return
    _raise_for(signum)


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Stopped(signal.Signals(signum).name)


def install_stop_handlers() -> None:
    """Ctrl-C, SIGTERM and SIGHUP raise in the main thread — except while a child is being
    spawned: an exception raised inside fork's at-fork callbacks is swallowed by CPython and
    can leave the logging module's lock held (seen as a hung thread later)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_stop_signal)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    global _deferring, _pending
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        if _pending is not None:
            signum, _pending = _pending, None
            _raise_for(signum)


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
        # Deferred signals: a Ctrl-C lands after the child is recorded, so teardown stops it.
        with _signals_deferred():
            # A fresh log per run; the child dies with the demo even if the demo is SIGKILLed.
            child.popen = process_group.spawn(
                child.args, child.log_path, env=merged, die_with_parent=True
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
        raise StartupError(
            f"{child.name} not ready at {url} after {timeout:.0f}s ({last}):\n{child.log_tail()}"
        )

    def stop_all(self, timeout: float = 5.0) -> None:
        """SIGTERM to every group at once, one shared deadline, then SIGKILL what is left."""
        running = [c.popen for c in reversed(self.children) if c.popen is not None]
        process_group.stop(running, timeout)

    def dead(self) -> str:
        """Children that exited, with their exit code and log ("" when all run)."""
        return ", ".join(
            f"{c.name} (exit {c.popen.returncode}, log {c.log_path})"
            for c in self.children
            if c.popen is not None and c.popen.poll() is not None
        )

    def survivors(self) -> list[str]:
        return [
            c.name
            for c in self.children
            if c.popen is not None and process_group.group_exists(c.popen.pid)
        ]
