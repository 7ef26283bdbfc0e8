"""Retry delays after consecutive failures: an exponential ceiling, then jitter under it.

Pure (the caller passes the random draw), so the schedules are tested with fixed draws. Used
by the identity client's refresher, the JWKS "no key yet" retry and the revocation poller.

Jitter spreads retries of a fleet that failed together (an issuer restart) so they do not
return in lock-step ("Exponential Backoff And Jitter", AWS Architecture Blog, 2015): ``spread``
1 is *full jitter* (anywhere in [0, ceiling]), ½ *equal jitter* (in [ceiling/2, ceiling], for
callers that must not retry at once).
"""

from __future__ import annotations

import math


def ceiling(failures: int, *, first: float, cap: float) -> float:
    """``first``·2ⁿ⁻¹ after the n-th failure in a row (1-based; 0 counts as 1), at most ``cap``."""
    exponent = min(max(failures - 1, 0), 62)  # 2**62 already exceeds any cap; no overflow
    return min(cap, first * math.ldexp(1.0, exponent))


def jittered(limit: float, draw: float, *, spread: float = 1.0) -> float:
    """A delay in [``limit``·(1 - ``spread``), ``limit``], placed by ``draw`` in [0, 1]."""
    return limit * (1.0 - spread + spread * draw)


def delay(failures: int, *, first: float, cap: float, draw: float, spread: float = 1.0) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure."""
    return jittered(ceiling(failures, first=first, cap=cap), draw, spread=spread)
