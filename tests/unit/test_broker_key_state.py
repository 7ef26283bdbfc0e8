"""Signing keys kept in ``state_dir`` (sidecar.broker.key_state): the whole ring with its
schedule survives a save and load; retired keys are kept public only; a file that is not the
broker's own is refused without echoing it; a changed algorithm retires the kept key."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sidecar.broker.config import parse_broker_config
from sidecar.broker.key_state import load_ring, ring_bytes, save_ring, state_path
from sidecar.broker.keys import KeyRing, Schedule, generate_private_key, make_signing_key
from sidecar.broker.service import BrokerService
from sidecar.errors import ConfigError

NOW = 1_700_000_000.0
SCHEDULE = Schedule("ES256", 100, 30, 50)


def _rotated_ring() -> KeyRing:
    """Active (second key), next (third) and one retired (first) key."""
    ring = KeyRing(SCHEDULE, make_signing_key(generate_private_key("ES256"), "ES256", NOW), NOW)
    ring.publish_next(make_signing_key(generate_private_key("ES256"), "ES256", NOW), NOW + 70)
    ring.advance(NOW + 100)
    nxt = make_signing_key(generate_private_key("ES256"), "ES256", NOW + 170)
    ring.publish_next(nxt, NOW + 170)
    return ring


def test_the_ring_and_its_schedule_survive_a_save_and_load(tmp_path: Path) -> None:
    ring = _rotated_ring()
    save_ring(str(tmp_path), ring)
    loaded = load_ring(str(tmp_path), SCHEDULE)
    assert loaded is not None
    assert loaded.jwks_bytes() == ring.jwks_bytes()
    assert [k.kid for k in loaded.published()] == [k.kid for k in ring.published()]
    for was, now in zip(ring.published(), loaded.published(), strict=True):
        assert (now.activates_at, now.retired_at, now.remove_at) == (
            was.activates_at,
            was.retired_at,
            was.remove_at,
        )
    # The schedule goes on where it was: the next key activates at its saved time.
    retired = ring.retired[0].kid
    assert [(e.event, e.kid) for e in loaded.advance(NOW + 199.9)] == [("key_removed", retired)]
    assert [e.event for e in loaded.advance(NOW + 200)] == ["key_activated", "key_retired"]
    assert loaded.active.private_key is not None  # the kept next key can sign


def test_retired_keys_are_kept_public_only_and_the_file_is_0600(tmp_path: Path) -> None:
    ring = _rotated_ring()
    save_ring(str(tmp_path), ring)
    path = Path(state_path(str(tmp_path)))
    assert path.stat().st_mode & 0o777 == 0o600
    doc = json.loads(path.read_text())
    assert "private_pem" in doc["active"] and "private_pem" in doc["next"]
    assert [set(k) & {"private_pem", "d"} for k in doc["retired"]] == [set()]
    assert "d" not in doc["retired"][0]["public_jwk"]


def test_no_file_yet_is_no_ring(tmp_path: Path) -> None:
    assert load_ring(str(tmp_path), SCHEDULE) is None


@pytest.mark.parametrize(
    "content",
    [b"not json", b'{"version": 2}', b'{"version": 1, "active": {"private_pem": "-----BEGIN"}}'],
)
def test_a_damaged_file_stops_the_start_without_echoing_it(tmp_path: Path, content: bytes) -> None:
    path = Path(state_path(str(tmp_path)))
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError) as err:
        load_ring(str(tmp_path), SCHEDULE)
    assert err.value.key == "state_dir"
    assert "BEGIN" not in str(err.value) and "not json" not in str(err.value)


def test_a_file_others_can_read_is_refused(tmp_path: Path) -> None:
    save_ring(str(tmp_path), _rotated_ring())
    os.chmod(state_path(str(tmp_path)), 0o644)
    with pytest.raises(ConfigError, match="0600"):
        load_ring(str(tmp_path), SCHEDULE)


def test_a_swapped_kid_is_refused(tmp_path: Path) -> None:
    """The kid is recomputed from the key: a file naming another kid is not ours."""
    doc = json.loads(ring_bytes(_rotated_ring()))
    doc["active"]["kid"] = "someone-else"
    path = Path(state_path(str(tmp_path)))
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    with pytest.raises(ConfigError):
        load_ring(str(tmp_path), SCHEDULE)


def _start_stop(tmp_path: Path, alg: str) -> list[tuple[str, str]]:
    cfg = parse_broker_config(
        {
            "listen": "127.0.0.1:0",
            "state_dir": str(tmp_path / "state"),
            "keys": {"algorithm": alg},
            "attestation": {"enabled": False},
            "admin": {"enabled": False, "socket": str(tmp_path / "run" / "admin.sock")},
            "audit": {"path": str(tmp_path / "audit.log")},
        }
    )
    service = BrokerService(cfg, CollectorRegistry())

    async def scenario() -> list[tuple[str, str]]:
        await service.start()
        try:
            assert service.broker is not None
            return [(k.kid, k.alg) for k in service.broker.ring.published()]
        finally:
            await service.stop()

    return asyncio.run(scenario())


def test_a_restart_keeps_the_kid_and_a_new_algorithm_retires_it(tmp_path: Path) -> None:
    first = _start_stop(tmp_path, "ES256")
    assert _start_stop(tmp_path, "ES256") == first
    changed = _start_stop(tmp_path, "Ed25519")
    assert changed[0][1] == "Ed25519" and changed[0][0] != first[0][0]
    assert first[0] in changed[1:], "the old key stays published for the tokens it signed"
