"""The shared rate-limited logger: first line at once, then one per interval per key with the
number held back; bounded keys. A fake clock, caplog."""

from __future__ import annotations

import logging

import pytest

from sidecar.observability.logs import RateLimitedLog

LOG = logging.getLogger("tests.ratelimited")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG.name]


def test_one_line_per_interval_with_the_count_held_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    clock = Clock()
    limited = RateLimitedLog(LOG, 30.0, clock=clock)
    written = []
    for i in range(600):  # 20 per second for 30 s, then one more
        written.append(limited.warning("issuer", "fetch failed n=%d", i))
        clock.now += 0.05
    clock.now += 0.05
    assert limited.warning("issuer", "fetch failed n=%d", 600)
    assert written[0] and not any(written[1:])
    assert lines(caplog) == [
        "fetch failed n=0",
        "fetch failed n=600 (repeated 599 times in the last 30 s)",
    ]


def test_keys_are_independent_and_resolved_writes_the_last_held_back_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    clock = Clock()
    limited = RateLimitedLog(LOG, 30.0, clock=clock)
    limited.warning("a", "a failed %s", 1)
    limited.warning("b", "b failed %s", 1)
    clock.now += 2
    limited.warning("a", "a failed %s", 2)
    limited.warning("a", "a failed %s", 3)
    limited.resolved("a")
    limited.resolved("b")  # nothing held back: nothing written
    limited.warning("a", "a failed %s", 4)  # a new episode: written at once
    assert lines(caplog) == [
        "a failed 1",
        "b failed 1",
        "a failed 3 (repeated 2 times in the last 2 s)",
        "a failed 4",
    ]


def test_keys_are_bounded() -> None:
    limited = RateLimitedLog(LOG, 30.0, clock=Clock(), max_keys=3)
    for key in range(10):
        limited.warning(key, "x")
    assert len(limited._keys) == 3
