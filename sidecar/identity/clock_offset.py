"""How far each peer's clock is from ours, learned from the ``Date`` of its answers, so DPoP
proofs carry an ``iat`` the peer accepts (sans-IO; the clock is passed in).

A verifier checks a proof's ``iat`` against its own clock (RFC 9449 §4.3 step 11, §11.1): a
sidecar whose clock runs ahead of the broker's or an upstream's by more than their leeway has
every proof refused, forever. RFC 9449 §8 suggests server nonces for this; the ``Date`` field
(RFC 9110 §6.6.1) is on every answer of every server, so the identity client (toward the
broker) and the egress proxy (toward upstreams) both learn from it, through one shared
:class:`ClockOffsets`.

Estimate: ``Date: D`` (whole seconds) was generated between sending at ``t0`` and receiving at
``t1`` on our clock, so the peer's clock read somewhere in ``[D, D+1)`` while ours read in
``[t0, t1]``: the offset is in ``[D - t1, D + 1 - t0]``. We take the middle; half the width is
the uncertainty (½ s plus half the round trip).

A reading is applied only when it is worth believing:

* the answer refused a proof and said its time was wrong (``x-authz-reason:
  iat_out_of_window``, our ingress), and the reading differs from the correction in force by
  more than its uncertainty; or
* it differs from the correction in force by more than ``threshold`` (2 s) plus its
  uncertainty — for refusals that do not say why (the broker's ``invalid_dpop_proof``) and,
  once a correction is in force, for ordinary answers, so the correction follows our clock
  back when it is fixed.

A reading beyond ``max_correction`` (10 min) is never applied, so a peer that lies about the
time cannot move our proofs arbitrarily far; it is logged. Corrections past ``warn_over``
(5 s) are logged as a WARNING, at most once per peer per ``log_interval``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from sidecar.errors import Reason
from sidecar.observability.logs import RateLimitedLog

log = logging.getLogger(__name__)

MAX_DATE_BYTES = 64  # "Sun, 06 Nov 1994 08:49:37 GMT" is 29
# iat outside the window, or not after a restarted replay store's epoch (a clock behind).
_TIME_REASONS = frozenset({Reason.IAT_OUT_OF_WINDOW.value, Reason.PROOF_PREDATES_RESTART.value})


@dataclass(frozen=True, slots=True)
class Reading:
    """One estimate of (peer clock - our clock), in seconds, ± ``uncertainty``."""

    offset: float
    uncertainty: float


def read_date(value: str | None, sent_at: float, received_at: float) -> Reading | None:
    """The offset a ``Date`` field implies, or None if it is absent or not an HTTP-date."""
    if not value or len(value) > MAX_DATE_BYTES:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 §5.6.7: an HTTP-date is always GMT
        return None
    try:
        peer = when.timestamp()
    except (OverflowError, OSError, ValueError):
        return None
    low, high = peer - received_at, peer + 1.0 - sent_at
    if not (math.isfinite(low) and math.isfinite(high)) or high < low:
        return None
    return Reading((low + high) / 2, (high - low) / 2)


def says_time_was_wrong(headers: Mapping[str, str]) -> bool:
    """True if a refusal names the proof's ``iat`` as its cause (our ingress's
    ``x-authz-reason``, which Envoy passes to the client on a deny)."""
    return headers.get("x-authz-reason") in _TIME_REASONS


class ClockOffsets:
    """The correction in force per peer (an origin, or ``unix:<socket>`` for the broker's
    attestation socket). ``now(peer)`` is the time to put in a proof for that peer. Bounded:
    the peer seen longest ago is forgotten first."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        threshold: float = 2.0,
        max_correction: float = 600.0,
        warn_over: float = 5.0,
        capacity: int = 256,
        log_interval: float = 300.0,
    ) -> None:
        self.clock = clock
        self.threshold = threshold
        self.max_correction = max_correction
        self.warn_over = warn_over
        self._capacity = capacity
        self._offsets: dict[str, float] = {}
        self._log = RateLimitedLog(log, log_interval, clock=clock)

    def offset(self, peer: str) -> float:
        """Seconds to add to our clock for ``peer`` (0 until something was learned)."""
        return self._offsets.get(peer, 0.0)

    def now(self, peer: str) -> float:
        return self.clock() + self._offsets.get(peer, 0.0)

    def in_force(self, peer: str) -> bool:
        return peer in self._offsets

    def learn(
        self,
        peer: str,
        date: str | None,
        sent_at: float,
        received_at: float,
        *,
        time_refused: bool = False,
    ) -> bool:
        """Take the ``Date`` of an answer sent at ``sent_at`` and received at ``received_at``
        (our clock, uncorrected). True if the correction for ``peer`` changed — a refused
        proof is then worth signing again."""
        reading = read_date(date, sent_at, received_at)
        if reading is None:
            return False
        current = self._offsets.get(peer, 0.0)
        change = abs(reading.offset - current)
        margin = reading.uncertainty if time_refused else self.threshold + reading.uncertainty
        if change <= margin:
            return False
        if abs(reading.offset) > self.max_correction:
            self._log.warning(
                ("ignored", peer),
                "clock offset peer=%s ignored: its Date says %+.0fs, beyond the %.0fs bound",
                peer,
                reading.offset,
                self.max_correction,
            )
            return False
        self._set(peer, reading.offset)
        if abs(reading.offset) > self.warn_over:
            self._log.warning(
                peer,
                "clock offset peer=%s offset=%+.1fs (±%.1fs): this host's clock and the peer's "
                "disagree; DPoP proofs to it carry a corrected iat (check NTP)",
                peer,
                reading.offset,
                reading.uncertainty,
            )
        else:
            log.info("clock offset peer=%s offset=%+.1fs", peer, reading.offset)
        return True

    def _set(self, peer: str, offset: float) -> None:
        self._offsets.pop(peer, None)
        if len(self._offsets) >= self._capacity:
            del self._offsets[next(iter(self._offsets))]
        self._offsets[peer] = offset

    def snapshot(self) -> list[tuple[str, float]]:
        """(peer, correction in force) for the metric."""
        return list(self._offsets.items())
