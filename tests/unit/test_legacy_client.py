"""The legacy client's one-line summary of an answer (no sockets: see the integration test)."""

from __future__ import annotations

import io
import json
from email.message import Message

import pytest

from sidecar.apps import legacy_client


def _headers(**values: str) -> Message:
    msg = Message()
    for name, value in values.items():
        msg[name.replace("_", "-")] = value
    return msg


def test_an_echo_answer_shows_the_identity_orders_saw() -> None:
    body = json.dumps({"app": "orders", "headers": {"x-workload-id": "spiffe://d/ns/shop/sa/f"}})
    assert (
        legacy_client.describe(200, _headers(), body.encode())
        == "200 app=orders as spiffe://d/ns/shop/sa/f"
    )


def test_an_echo_answer_without_identity_says_so() -> None:
    body = json.dumps({"app": "orders", "headers": {}}).encode()
    assert legacy_client.describe(200, _headers(), body) == "200 app=orders as (no identity)"


def test_a_denial_shows_the_reason() -> None:
    headers = _headers(x_authz_reason="policy_denied")
    assert legacy_client.describe(403, headers, b'{"error": "x"}') == "403 reason=policy_denied"
    assert legacy_client.describe(401, _headers(), b"not json") == "401"


def test_run_counts_calls_and_fails_only_without_an_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = iter([(True, "403 reason=policy_denied"), (False, "error: refused")])
    monkeypatch.setattr(legacy_client, "call_once", lambda url, timeout: next(answers))
    slept: list[float] = []
    out = io.StringIO()
    code = legacy_client.run(
        "http://x/o", name="r", every=5, count=2, timeout=1, out=out, sleep=slept.append
    )
    assert code == 1
    assert slept == [5]  # between calls, not before the first
    assert out.getvalue().splitlines() == [
        "r GET http://x/o -> 403 reason=policy_denied",
        "r GET http://x/o -> error: refused",
    ]
