"""The refresh schedule (sans-IO): half-life refresh with jitter, full-jitter backoff, the
safety margin, on-demand fetch limits. Fixed instants and fixed random draws only."""

from __future__ import annotations

import math

import pytest

from sidecar.identity.errors import IdentityCode, IdentityError
from sidecar.identity.schedule import MIN_DELAY, AudienceState, RefreshPolicy
from sidecar.identity.token import IssuedToken

NOW = 1_700_000_000.0
AUD = "spiffe://demo.local/ns/shop/sa/orders"


def token(ttl: float = 300.0, now: float = NOW) -> IssuedToken:
    return IssuedToken("t.o.k", "DPoP", expires_at=now + ttl, issued_at=now, audience=AUD)


UNAVAILABLE = IdentityError(IdentityCode.UNAVAILABLE, "connection refused")
DENIED = IdentityError(IdentityCode.ACCESS_DENIED, "no registration entry")


@pytest.mark.parametrize(
    ("draw", "expected"),
    [(0.5, 150.0), (0.0, 135.0), (1.0, 165.0)],  # ½ of 300 s, ± 10 %
)
def test_refresh_at_half_the_remaining_lifetime_with_jitter(draw: float, expected: float) -> None:
    assert RefreshPolicy().refresh_delay(token(), NOW, draw) == pytest.approx(expected)


def test_refresh_counts_from_now_not_from_issue() -> None:
    # A token that already lived 200 of its 300 s: half of the REMAINING 100 s.
    tok = token(now=NOW - 200)
    assert RefreshPolicy().refresh_delay(tok, NOW, 0.5) == pytest.approx(50.0)


def test_margin_scales_down_for_short_tokens() -> None:
    policy = RefreshPolicy(min_remaining=5.0, min_remaining_fraction=0.25)
    assert policy.margin(token(300)) == 5.0
    assert policy.margin(token(4)) == 1.0  # a 5 s margin would make a 4 s token useless
    assert policy.usable_until(token(4)) == NOW + 3.0


def test_short_token_refreshes_before_it_becomes_unusable() -> None:
    policy = RefreshPolicy(min_interval=1.0)
    for ttl in (2.0, 3.0, 4.0, 6.0, 10.0):
        tok = token(ttl)
        for draw in (0.0, 0.5, 1.0):
            delay = policy.refresh_delay(tok, NOW, draw)
            assert MIN_DELAY <= delay < policy.usable_until(tok) - NOW, (ttl, draw, delay)


def test_max_interval_caps_the_refresh_delay() -> None:
    assert RefreshPolicy(max_interval=10).refresh_delay(token(3600), NOW, 0.5) == 10.0


@pytest.mark.parametrize(
    ("failures", "ceiling"), [(1, 0.5), (2, 1.0), (3, 2.0), (8, 30.0), (80, 30.0)]
)
def test_backoff_is_exponential_with_full_jitter_and_capped(failures: int, ceiling: float) -> None:
    policy = RefreshPolicy(backoff_initial=0.5, backoff_max=30.0)
    assert policy.backoff_delay(failures, UNAVAILABLE, 1.0) == pytest.approx(ceiling)
    assert policy.backoff_delay(failures, UNAVAILABLE, 0.5) == pytest.approx(ceiling / 2)
    # Full jitter: the draw spans all of [0, ceiling] (floored so nothing spins).
    assert policy.backoff_delay(failures, UNAVAILABLE, 0.0) == MIN_DELAY


def test_backoff_honours_retry_after() -> None:
    err = IdentityError(IdentityCode.TEMPORARILY_UNAVAILABLE, "busy", retry_after=7.0)
    assert RefreshPolicy().backoff_delay(1, err, 0.1) == 7.0


def test_non_retryable_errors_wait_near_the_cap() -> None:
    policy = RefreshPolicy(backoff_max=30.0)
    assert not DENIED.retryable
    assert 15.0 <= policy.backoff_delay(1, DENIED, 0.0) <= policy.backoff_delay(1, DENIED, 1.0)
    assert policy.backoff_delay(1, DENIED, 1.0) == 30.0


def test_state_success_schedules_refresh_and_clears_errors() -> None:
    state = AudienceState(AUD, RefreshPolicy())
    assert state.next_attempt_at == -math.inf  # fetch at once
    state.on_attempt(NOW)
    state.on_failure(UNAVAILABLE, NOW, 0.5)
    assert state.failures == 1 and state.last_error is UNAVAILABLE
    state.on_attempt(NOW + 1)
    at = state.on_success(token(now=NOW + 1), NOW + 1, 0.5)
    assert at == pytest.approx(NOW + 1 + 150)
    assert state.failures == 0 and state.last_error is None and state.ever_had_token


def test_usable_token_is_never_one_inside_the_margin() -> None:
    state = AudienceState(AUD, RefreshPolicy(min_remaining=5.0))
    state.on_success(token(60), NOW, 0.5)
    assert state.usable(NOW + 54.9) is not None
    assert state.usable(NOW + 55.0) is None
    assert state.usable(NOW + 61) is None


def test_each_new_token_brings_its_own_usable_window() -> None:
    """The window is computed once per token: a shorter successor must not inherit a longer
    one, nor a longer successor a shorter one."""
    state = AudienceState(AUD, RefreshPolicy(min_remaining=5.0))
    assert state.usable(NOW) is None
    state.on_success(token(600), NOW, 0.5)
    state.on_success(short := token(60), NOW, 0.5)
    assert state.usable(NOW + 54.9) is short and state.usable(NOW + 55.0) is None
    state.on_success(long := token(600), NOW, 0.5)
    assert state.usable(NOW + 594.9) is long and state.usable(NOW + 595.0) is None


def test_failure_keeps_the_cached_token_and_retries_before_it_becomes_unusable() -> None:
    policy = RefreshPolicy(backoff_initial=10, backoff_max=100, min_remaining=5)
    state = AudienceState(AUD, policy)
    state.on_success(token(20), NOW, 0.5)
    # Failing at NOW+10: backoff would say up to 10 s, but the token stops being usable at +15.
    state.on_failure(UNAVAILABLE, NOW + 10, 1.0)
    assert state.usable(NOW + 10) is not None
    assert state.next_attempt_at == pytest.approx(NOW + 15)
    # Once it is unusable, the plain backoff applies again.
    state.on_failure(UNAVAILABLE, NOW + 15, 1.0)
    assert state.next_attempt_at == pytest.approx(NOW + 15 + 20)


def test_on_demand_fetches_are_rate_limited() -> None:
    state = AudienceState(AUD, RefreshPolicy(demand_interval=1.0))
    state.on_success(token(20), NOW, 0.5)
    state.on_attempt(NOW + 16)  # a refresh; the token is no longer usable and nothing failed
    assert not state.may_fetch_on_demand(NOW + 16.5)
    assert state.may_fetch_on_demand(NOW + 17.0)


def test_on_demand_fetches_keep_to_the_backoff_while_the_issuer_fails() -> None:
    policy = RefreshPolicy(backoff_initial=1, backoff_max=8, demand_interval=0.1)
    state = AudienceState(AUD, policy)
    assert state.may_fetch_on_demand(NOW)
    now = NOW
    for failures in range(1, 7):
        state.on_attempt(now)
        state.on_failure(UNAVAILABLE, now, 1.0)
        backoff = min(8, 2 ** (failures - 1))
        # demand_interval alone would allow a fetch 0.1 s later; the backoff does not.
        assert not state.may_fetch_on_demand(now + backoff - 0.01)
        assert state.may_fetch_on_demand(now + backoff)
        now += backoff


def test_no_on_demand_fetch_while_a_usable_token_is_cached() -> None:
    state = AudienceState(AUD, RefreshPolicy())
    state.on_success(token(300), NOW, 0.5)
    assert not state.may_fetch_on_demand(NOW + 100)


def test_non_retryable_error_suppresses_on_demand_fetches_until_the_next_attempt() -> None:
    state = AudienceState(AUD, RefreshPolicy(backoff_max=30, demand_interval=1))
    state.on_attempt(NOW)
    state.on_failure(DENIED, NOW, 0.0)  # next attempt at NOW + 15
    assert not state.may_fetch_on_demand(NOW + 5)
    assert state.may_fetch_on_demand(NOW + 15)


def test_unavailable_reason_explains_without_the_token() -> None:
    state = AudienceState(AUD, RefreshPolicy())
    assert "no token has been obtained yet" in state.unavailable_reason(NOW)
    tok = token(10)
    state.on_success(tok, NOW, 0.5)
    state.on_attempt(NOW + 12)
    state.on_failure(UNAVAILABLE, NOW + 12, 0.5)
    reason = state.unavailable_reason(NOW + 12)
    assert "expired 2.0s ago" in reason
    assert "unavailable: connection refused" in reason
    assert "next attempt in" in reason
    assert tok.token not in reason
