"""The one retry schedule: exponential ceiling, jitter under it."""

from __future__ import annotations

import pytest

from sidecar import backoff


@pytest.mark.parametrize(
    ("failures", "expected"), [(0, 0.5), (1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (10**6, 30.0)]
)
def test_ceiling_doubles_from_first_up_to_the_cap(failures: int, expected: float) -> None:
    assert backoff.ceiling(failures, first=0.5, cap=30.0) == expected


@pytest.mark.parametrize(("spread", "low"), [(1.0, 0.0), (0.5, 4.0), (0.0, 8.0)])
def test_jitter_spans_the_spread_below_the_limit(spread: float, low: float) -> None:
    assert backoff.jittered(8.0, 0.0, spread=spread) == low
    assert backoff.jittered(8.0, 1.0, spread=spread) == 8.0
    assert backoff.jittered(8.0, 0.5, spread=spread) == (low + 8.0) / 2


def test_delay_is_the_jittered_ceiling() -> None:
    assert backoff.delay(3, first=1.0, cap=30.0, draw=0.25) == 1.0  # full jitter of 4 s
    assert backoff.delay(3, first=1.0, cap=30.0, draw=0.0, spread=0.5) == 2.0
