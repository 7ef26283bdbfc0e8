"""A broker restart keeps its signing keys when ``state_dir`` is set: the same ``kid`` signs,
and a token issued before the restart still verifies against the JWKS published after it."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from sidecar.jose.b64 import b64url_decode
from tests.integration.harness import http_request
from tests.integration.test_broker import ORDERS, verify_independently
from tests.integration.test_broker_helpers import BrokerProcess, new_signer, python_entries

pytestmark = pytest.mark.integration


def _kids(broker: BrokerProcess) -> list[str]:
    status, _, body = http_request(f"{broker.issuer}/jwks.json")
    assert status == 200
    return [k["kid"] for k in json.loads(body)["keys"]]


def test_restart_keeps_keys_with_a_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    broker = BrokerProcess(tmp_path, entries=python_entries(), extra={"state_dir": str(state)})
    broker.start()
    try:
        before = _kids(broker)
        answer = broker.unix_token([ORDERS], new_signer())
        assert answer.status == 200, answer.body
        broker.restart()
        assert _kids(broker) == before
        claims = verify_independently(broker, answer.token)  # signed before the restart
        assert claims["aud"] == ORDERS
        again = broker.unix_token([ORDERS], new_signer())
        assert again.status == 200, again.body
        assert json.loads(b64url_decode(again.token.split(".")[0]))["kid"] == before[0]
    finally:
        broker.stop()
    mode = stat.S_IMODE((state / "keys.json").stat().st_mode)
    assert mode == 0o600, oct(mode)


def test_restart_without_a_state_dir_gets_new_keys(tmp_path: Path) -> None:
    """The control: without state_dir the keys are new on each start (what a state_dir
    prevents), so the test above can tell the difference."""
    broker = BrokerProcess(tmp_path, entries=python_entries())
    broker.start()
    try:
        before = _kids(broker)
        broker.restart()
        assert set(_kids(broker)).isdisjoint(before)
    finally:
        broker.stop()
