"""When to refresh a token and when to retry: pure functions of (state, now, a random draw).

No clock, no sleep, no I/O: :class:`~sidecar.identity.source.TokenSource` asks these for the
next deadline and does the waiting. Tests drive them with a fake clock and fixed draws.

* Refresh at about ``refresh_fraction`` (½) of the REMAINING lifetime, ± ``jitter`` of that,
  so that replicas started together drift apart and a fleet never refreshes in lock-step.
* A token is *usable* (may be sent) until ``expires_at - margin``, where the margin is
  ``min_remaining`` seconds but at most ``min_remaining_fraction`` of the token's lifetime (a
  5 s margin would make a 4 s token useless). A request never gets an unusable token.
* On failure: exponential backoff with FULL jitter (delay = U(0, min(cap, base·2ⁿ⁻¹)); see
  "Exponential Backoff And Jitter", AWS Architecture Blog 2015), never sooner than the
  issuer's ``Retry-After``. While the cached token is still usable the next attempt is never
  later than the moment it stops being usable. Non-retryable errors (``invalid_target``,
  ``access_denied``...) are retried only at the cap: a registration entry may be fixed.
* On demand: a request that finds no usable token may trigger a fetch, at most once per
  ``demand_interval``. After a failure, demand fetches share the backoff: an outage costs the
  issuer the backoff schedule per audience whatever the request rate, and traffic resumes
  within one backoff delay (at most ``backoff_max``) after the issuer returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sidecar import backoff
from sidecar.identity.errors import IdentityError
from sidecar.identity.token import IssuedToken

MIN_DELAY = 0.05  # never spin: the shortest wait between two attempts


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    refresh_fraction: float = 0.5
    jitter: float = 0.1
    min_remaining: float = 5.0
    min_remaining_fraction: float = 0.25
    min_interval: float = 1.0
    max_interval: float | None = None
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    demand_interval: float = 1.0
    fetch_timeout: float = 10.0
    request_wait: float = 2.0

    def margin(self, token: IssuedToken) -> float:
        return min(self.min_remaining, self.min_remaining_fraction * max(token.lifetime, 0.0))

    def usable_until(self, token: IssuedToken) -> float:
        return token.expires_at - self.margin(token)

    def refresh_delay(self, token: IssuedToken, now: float, draw: float) -> float:
        """Seconds from ``now`` (just after ``token`` arrived) to its refresh."""
        remaining = token.expires_at - now
        delay = remaining * self.refresh_fraction * (1.0 + self.jitter * (2.0 * draw - 1.0))
        delay = max(delay, self.min_interval)
        if self.max_interval is not None:
            delay = min(delay, self.max_interval)
        # Always before the token stops being usable (a refresh then has time to fail and retry).
        latest = self.usable_until(token) - now
        return max(MIN_DELAY, min(delay, latest * 0.9))

    def backoff_delay(self, failures: int, error: IdentityError, draw: float) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure (1-based)."""
        if not error.retryable:
            delay = backoff.jittered(self.backoff_max, draw, spread=0.5)
        else:
            delay = backoff.delay(
                failures, first=self.backoff_initial, cap=self.backoff_max, draw=draw
            )
        if error.retry_after is not None:
            delay = max(delay, error.retry_after)
        return max(MIN_DELAY, delay)


class AudienceState:
    """Everything known about one audience's token. Mutated only by the ``on_*`` methods."""

    def __init__(self, audience: str, policy: RefreshPolicy) -> None:
        self.audience = audience
        self.policy = policy
        self.token: IssuedToken | None = None
        # When the token stops being usable, computed once per token: every egress request
        # asks (policy and token are immutable).
        self._usable_until = -math.inf
        self.failures = 0
        self.last_error: IdentityError | None = None
        self.last_error_at: float | None = None
        self.last_attempt_at = -math.inf
        self.next_attempt_at = -math.inf  # fetch at once
        self.fetches = 0
        self.ever_had_token = False

    def usable(self, now: float) -> IssuedToken | None:
        return self.token if now < self._usable_until else None

    def on_attempt(self, now: float) -> None:
        self.last_attempt_at = now
        self.fetches += 1

    def on_success(self, token: IssuedToken, now: float, draw: float) -> float:
        """Record a new token; returns when to refresh it."""
        self.token = token
        self._usable_until = self.policy.usable_until(token)
        self.ever_had_token = True
        self.failures = 0
        self.last_error = None
        self.next_attempt_at = now + self.policy.refresh_delay(token, now, draw)
        return self.next_attempt_at

    def on_failure(self, error: IdentityError, now: float, draw: float) -> float:
        """Record a failed fetch; returns when to try again. The cached token is kept: it
        stays in use until it is no longer usable."""
        self.failures += 1
        self.last_error = error
        self.last_error_at = now
        delay = self.policy.backoff_delay(self.failures, error, draw)
        if self.token is not None:
            usable_for = self.policy.usable_until(self.token) - now
            if usable_for > 0:
                delay = min(delay, max(MIN_DELAY, usable_for))
        self.next_attempt_at = now + delay
        return self.next_attempt_at

    def may_fetch_on_demand(self, now: float) -> bool:
        """A request found no usable token: may it trigger a fetch right now?"""
        if self.usable(now) is not None:
            return False
        if self.last_error is not None:
            # The issuer is failing: a demand fetch keeps to the backoff like the refresher,
            # so a fleet with traffic costs a dead issuer no more than an idle one.
            return now >= self.next_attempt_at
        return now - self.last_attempt_at >= self.policy.demand_interval

    def unavailable_reason(self, now: float) -> str:
        """Why no token can be sent, for the 503 body and logs (never the token itself)."""
        parts = []
        if self.token is None:
            parts.append("no token has been obtained yet")
        else:
            ago = now - self.token.expires_at
            if ago >= 0:
                parts.append(f"the cached token expired {ago:.1f}s ago")
            else:
                parts.append(f"the cached token expires in {-ago:.1f}s (inside the safety margin)")
        if self.last_error is not None:
            parts.append(
                f"last fetch failed ({self.failures} in a row): {self.last_error.code}: "
                f"{self.last_error.detail}"
            )
        retry_in = self.next_attempt_at - now
        if retry_in > 0 and math.isfinite(retry_in):
            parts.append(f"next attempt in {retry_in:.1f}s")
        return "; ".join(parts)
