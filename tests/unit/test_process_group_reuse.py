"""process_group never signals a group id that may have been handed to another process: the
leader was reaped earlier and its pid is alive again (a wrapped pid counter)."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from sidecar import process_group


class _Reaped:
    """A Popen whose leader exited and was reaped; ``pid`` is whatever number it had."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode = 0

    def poll(self) -> int:
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0


@pytest.fixture
def signals(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    sent: list[tuple[int, int]] = []

    def killpg(pgid: int, sig: int) -> None:
        sent.append((pgid, sig))
        raise ProcessLookupError

    monkeypatch.setattr(os, "killpg", killpg)
    return sent


def test_a_reused_pid_is_not_signalled(signals: list[tuple[int, int]]) -> None:
    reused: Any = _Reaped(os.getpid())  # a live process holds the number now: this one
    process_group.stop([reused], timeout=0.1)
    process_group.kill(reused, timeout=0.1)
    assert signals == []


def test_a_reaped_leaders_group_is_still_swept(signals: list[tuple[int, int]]) -> None:
    # No process has the pid: members left in the group (if any) are ours and get signalled.
    free = next(p for p in range(300_000, 400_000) if not os.path.exists(f"/proc/{p}"))
    gone: Any = _Reaped(free)
    process_group.stop([gone], timeout=0.1)
    assert signals[0] == (free, signal.SIGTERM)
    assert (free, signal.SIGKILL) in signals
