"""A child process in its own process group, logged to a file, stopped as a group.

The one supervisor primitive shared by the demo (`sidecar.demo.supervisor`) and the test
harness (`tests/integration/harness.py`): start with :func:`spawn`, stop with :func:`stop`
(SIGTERM to the group, SIGKILL after a deadline, until no member is left).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    # Resolved here, in the parent: dlopen between fork and exec is unsafe once threads run.
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - not Linux: teardown still runs
        return None


_PRCTL = _load_prctl()


def _die_with_parent(parent: int) -> Callable[[], None]:
    def hook() -> None:
        """In the child before exec: SIGTERM when the parent dies, even by SIGKILL (Linux).

        Without it a killed supervisor (no chance to run its teardown) would orphan servers
        holding their ports."""
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def spawn(
    args: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str],
    cwd: str | None = None,
    append: bool = False,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``args`` as the leader of a new session (its pid is the group id), stdout and
    stderr to ``log_path`` (appended to, or a fresh file), stdin closed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab" if append else "wb") as log:
        return subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,  # its own group: stop() reaches its children too
            preexec_fn=_die_with_parent(os.getpid()) if die_with_parent else None,
        )


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _someone_else_has(popen: subprocess.Popen[bytes]) -> bool:
    """The leader was reaped and its pid names a live process again: the group id may now be
    another's (pid_max is 32768 on many hosts; a long run wraps it), so it is not signalled.
    While a member of our group lives, the kernel does not hand the id out again."""
    return popen.returncode is not None and os.path.exists(f"/proc/{popen.pid}")


def kill(popen: subprocess.Popen[bytes], timeout: float = 2.0) -> None:
    """SIGKILL the group until it is gone (the leader may be reaped before its group ends)."""
    if popen.poll() is None:
        signal_group(popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not _someone_else_has(popen):
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def stop(popens: Sequence[subprocess.Popen[bytes]], timeout: float = 5.0) -> None:
    """SIGTERM every group at once, wait on one shared deadline, then SIGKILL what is left
    (a child the leader left behind in its group included)."""
    popens = [p for p in popens if not _someone_else_has(p)]
    for popen in popens:
        signal_group(popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for popen in popens:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=max(0.0, deadline - time.monotonic()))
    for popen in popens:
        kill(popen)
