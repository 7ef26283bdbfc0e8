"""Learning a peer's clock from the ``Date`` of its answers (sans-IO, a fake clock): the
estimate and its uncertainty, when a reading is believed, the bound against a lying peer, the
rate-limited warning — and that a skewed token response's ``exp`` is brought to our clock."""

from __future__ import annotations

import json
import logging
from email.utils import formatdate

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from multidict import CIMultiDict

from sidecar.identity.clock_offset import ClockOffsets, read_date, says_time_was_wrong
from sidecar.identity.rfc8693_exchange import parse_token_response, proof_refused
from sidecar.jose.rfc7515_jws import sign_compact

NOW = 1_700_000_000.0  # our clock
PEER = "unix:/run/broker.sock"


def date(t: float) -> str:
    return formatdate(t, usegmt=True)  # an IMF-fixdate, whole seconds


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def test_the_estimate_is_the_middle_of_what_date_allows() -> None:
    # The peer read 30 s behind us; Date truncates to the second; 0.2 s round trip.
    reading = read_date(date(NOW - 30), NOW - 0.2, NOW)
    assert reading is not None
    # offset in [D - t1, D + 1 - t0] = [-30, -28.8]
    assert reading.offset == pytest.approx(-29.4)
    assert reading.uncertainty == pytest.approx(0.6)


@pytest.mark.parametrize(
    "value", [None, "", "yesterday", "Sun, 06 Nov 1994 08:49:37", "x" * 65, "Sun, 99 Nov 1994"]
)
def test_what_is_not_an_http_date_is_no_reading(value: str | None) -> None:
    assert read_date(value, NOW, NOW) is None


def test_a_refusal_that_names_the_time_is_believed_beyond_its_uncertainty() -> None:
    offsets = ClockOffsets(Clock())
    # 1.5 s off: under the 2 s threshold, but the refusal says iat was the problem.
    assert not offsets.learn(PEER, date(NOW + 1.5), NOW, NOW)
    assert offsets.offset(PEER) == 0.0 and not offsets.in_force(PEER)
    assert offsets.learn(PEER, date(NOW + 1.5), NOW, NOW, time_refused=True)
    assert offsets.offset(PEER) == pytest.approx(1.5, abs=0.5)
    assert offsets.now(PEER) == pytest.approx(NOW + 1.5, abs=0.5)
    assert offsets.now("http://other") == NOW, "per peer"
    # The same reading again changes nothing: no second retry for nothing.
    assert not offsets.learn(PEER, date(NOW + 1.5), NOW, NOW, time_refused=True)


def test_a_refusal_that_does_not_say_why_needs_more_than_the_threshold() -> None:
    offsets = ClockOffsets(Clock(), threshold=2.0)
    assert not offsets.learn(PEER, date(NOW - 1), NOW, NOW)  # Date's own resolution
    assert offsets.learn(PEER, date(NOW - 30), NOW, NOW)
    assert offsets.offset(PEER) == pytest.approx(-29.5)
    # Our clock got fixed: the next reading brings the correction back.
    assert offsets.learn(PEER, date(NOW), NOW, NOW)
    assert offsets.offset(PEER) == pytest.approx(0.5)


def test_a_slow_answer_is_trusted_less() -> None:
    offsets = ClockOffsets(Clock(), threshold=2.0)
    # 4 s off, but the answer took 6 s: the reading could be anywhere in a 7 s range.
    assert not offsets.learn(PEER, date(NOW - 4), NOW - 6, NOW)
    assert offsets.learn(PEER, date(NOW - 4), NOW - 0.1, NOW)


def test_a_peer_cannot_move_us_beyond_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    offsets = ClockOffsets(Clock(), max_correction=600)
    assert not offsets.learn(PEER, date(NOW + 3600), NOW, NOW, time_refused=True)
    assert offsets.offset(PEER) == 0.0
    assert offsets.learn(PEER, date(NOW + 590), NOW, NOW, time_refused=True)
    assert offsets.offset(PEER) == pytest.approx(590.5)
    assert any("ignored" in r.getMessage() for r in caplog.records)


def test_large_offsets_warn_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    offsets = ClockOffsets(clock, warn_over=5.0, log_interval=300)
    for i in range(10):  # the peer's clock wanders; each reading is applied
        clock.now += 1
        assert offsets.learn(PEER, date(clock.now - 30 - 3 * (i % 2)), clock.now, clock.now)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"clock offset peer={PEER} offset=-29.5s")
    [(peer, offset)] = offsets.snapshot()
    assert peer == PEER and offset == pytest.approx(-32.5)


def test_peers_are_bounded() -> None:
    offsets = ClockOffsets(Clock(), capacity=2)
    for n in range(5):
        offsets.learn(f"http://p{n}", date(NOW + 60), NOW, NOW)
    assert [p for p, _ in offsets.snapshot()] == ["http://p3", "http://p4"]


def test_what_counts_as_a_refused_proof() -> None:
    body = json.dumps({"error": "invalid_dpop_proof"}).encode()
    assert proof_refused(400, {}, body)
    assert proof_refused(400, {}, b'{"error":"use_dpop_nonce"}')
    assert proof_refused(401, {"WWW-Authenticate": 'DPoP error="invalid_dpop_proof"'}, b"")
    assert not proof_refused(400, {}, b'{"error":"invalid_grant"}')
    assert not proof_refused(401, {"WWW-Authenticate": 'DPoP error="invalid_token"'}, b"")
    assert not proof_refused(503, {}, body)
    assert says_time_was_wrong(CIMultiDict({"X-Authz-Reason": "iat_out_of_window"}))
    # A clock behind makes a fresh proof look older than a restarted replay store (503).
    assert says_time_was_wrong(CIMultiDict({"x-authz-reason": "proof_predates_restart"}))
    assert not says_time_was_wrong(CIMultiDict({"x-authz-reason": "replayed"}))


def test_the_exp_of_a_token_from_a_skewed_issuer_is_brought_to_our_clock() -> None:
    # Our clock runs 30 s ahead: the issuer's exp (its clock) reads 30 s early on ours.
    at = sign_compact(ec.derive_private_key(7, ec.SECP256R1()), "ES256", {"exp": NOW - 30 + 100})
    body = json.dumps({"access_token": at, "token_type": "DPoP", "expires_in": 300}).encode()

    def expires_at(clock_offset: float) -> float:
        return parse_token_response(
            200,
            {},
            body,
            audience="a",
            requested_at=NOW,
            expected_jkt="j",
            require_dpop=True,
            clock_offset=clock_offset,
        ).expires_at

    assert expires_at(0.0) == NOW + 70, "seen as 30 s shorter than it is"
    assert expires_at(-30.0) == NOW + 100
