"""What a broker keeps in ``state_dir`` across restarts: its signing keys (the same ``kid``
signs, and a token issued before the restart still verifies against the JWKS published after
it) and the registration entries added at run time with ``sidecar broker entries``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from sidecar.jose.b64 import b64url_decode
from tests.integration.broker_process import BrokerProcess, new_signer, python_entries
from tests.integration.harness import http_request
from tests.integration.test_broker import ORDERS, verify_independently


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


def test_entries_cli_adds_lists_and_removes_over_the_admin_socket(tmp_path: Path) -> None:
    """``sidecar broker entries``: an entry added at run time admits the workload at once,
    is listed as ``runtime``, survives a restart (state_dir), and its removal refuses it."""
    broker = BrokerProcess(tmp_path, entries=[], extra={"state_dir": str(tmp_path / "state")})
    broker.start()
    spiffe_id = "spiffe://demo.local/unix/added"
    try:
        assert broker.unix_token([ORDERS], new_signer()).status == 403
        rc, out, err = broker.cli(
            ["entries", "add"],
            "--spiffe-id",
            spiffe_id,
            "--selector",
            f"unix:uid:{os.getuid()}",
            "--audience",
            "**",
        )
        assert rc == 0, err
        assert json.loads(out)["spiffe_id"] == spiffe_id
        answer = broker.unix_token([ORDERS], new_signer())
        assert answer.status == 200, answer.body
        assert verify_independently(broker, answer.token)["sub"] == spiffe_id
        rc, out, err = broker.cli(["entries", "list"])
        assert rc == 0, err
        listed = json.loads(out)["entries"]
        assert [(e["spiffe_id"], e["source"]) for e in listed] == [(spiffe_id, "runtime")]

        broker.restart()
        assert broker.unix_token([ORDERS], new_signer()).status == 200, "kept in state_dir"

        rc, out, err = broker.cli(["entries", "remove"], "--spiffe-id", spiffe_id)
        assert rc == 0, err
        assert broker.unix_token([ORDERS], new_signer()).status == 403
        rc, _, err = broker.cli(["entries", "remove"], "--spiffe-id", spiffe_id)
        assert rc == 1 and "no entry added at run time" in err
    finally:
        broker.stop()


def test_sighup_swaps_entries_and_refuses_a_restart_only_change(tmp_path: Path) -> None:
    """A real broker process: the workload is refused, its entry is written to the file and
    SIGHUP sent, and it gets a token, with no restart. A reload that moves ``listen`` is
    refused (counted ``error``, named in the log) and the entries in force stay."""
    from tests.integration.test_reload import Running

    broker = BrokerProcess(tmp_path, entries=[]).start()
    try:
        running = Running(
            broker.process,
            broker.config_path,
            yaml.safe_load(broker.config_path.read_text()),
            broker.admin_port,
        )
        assert broker.unix_token([ORDERS], new_signer()).status == 403

        def add_entries(cfg: dict[str, Any]) -> None:
            cfg["entries"] = python_entries()

        running.write(add_entries)
        running.sighup_and_wait("ok")
        answer = broker.unix_token([ORDERS], new_signer())
        assert answer.status == 200, answer.body
        assert verify_independently(broker, answer.token)["sub"].endswith("/unix/python")

        def move_listen(cfg: dict[str, Any]) -> None:
            cfg["entries"] = []  # would refuse the workload, were it applied
            cfg["listen"] = "127.0.0.1:1"

        running.write(move_listen)
        running.sighup_and_wait("error")
        assert "listen: expected its value at start" in broker.process.log_text(tail=4000)
        assert broker.unix_token([ORDERS], new_signer()).status == 200, "old entries stay"
        assert broker.process.stop() == 0
    finally:
        broker.stop()
