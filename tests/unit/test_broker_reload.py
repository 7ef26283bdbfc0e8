"""``BrokerService.reload``: a re-read configuration's entries and token settings are swapped
in at once; a change that needs a restart is refused with the key named and the old
configuration kept. Entries added at run time (the admin socket's ``change_entries``) are kept
in ``state_dir`` and survive reloads and restarts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry

from sidecar.broker.config import BrokerConfig, parse_broker_config
from sidecar.broker.core import Broker
from sidecar.broker.oauth import OAuthError
from sidecar.broker.service import BrokerService
from sidecar.errors import ConfigError

A = {"spiffe_id": "spiffe://t/a", "selectors": ["unix:uid:1"], "audiences": ["**"]}
B = {"spiffe_id": "spiffe://t/b", "selectors": ["unix:uid:2"], "audiences": ["svc-*"]}
C = {"spiffe_id": "spiffe://t/c", "selectors": ["unix:uid:3"], "audiences": ["x"]}
T = TypeVar("T")


def _config(tmp_path: Path, **top: Any) -> BrokerConfig:
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "entries": [A],
        "state_dir": str(tmp_path / "state"),
        "attestation": {"enabled": False},
        "admin": {"enabled": False, "socket": str(tmp_path / "run" / "admin.sock")},
        "audit": {"path": str(tmp_path / "audit.log")},
    }
    data.update(top)
    return parse_broker_config(data)


def _running(tmp_path: Path, scenario: Callable[[BrokerService, Broker], Awaitable[T]]) -> T:
    service = BrokerService(_config(tmp_path), CollectorRegistry())

    async def run() -> T:
        await service.start()
        try:
            assert service.broker is not None
            return await scenario(service, service.broker)
        finally:
            await service.stop()

    return asyncio.run(run())


def _subject(broker: Broker, uid: int) -> str | None:
    entry = broker.registry.match({f"unix:uid:{uid}", "unix:gid:0"})
    return None if entry is None else entry.spiffe_id


def test_reload_swaps_entries_and_token_settings(tmp_path: Path) -> None:
    async def scenario(service: BrokerService, broker: Broker) -> None:
        assert (_subject(broker, 1), _subject(broker, 2)) == ("spiffe://t/a", None)
        await service.reload(_config(tmp_path, entries=[B], tokens={"ttl": 120}))
        assert (_subject(broker, 1), _subject(broker, 2)) == (None, "spiffe://t/b")
        assert broker.cfg.token_ttl == 120 and service.cfg.token_ttl == 120
        # The issuer derived from the bound port at start is kept (the file says port 0).
        assert broker.cfg.issuer == f"http://127.0.0.1:{service.http_port}"

    _running(tmp_path, scenario)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"listen": "127.0.0.1:1"}, "listen"),
        ({"dpop": {"max_age": 30}}, "dpop"),
        ({"keys": {"algorithm": "ES384"}}, "keys"),
        ({"issuer": "http://127.0.0.1:9"}, "issuer"),
        ({"revocation": {"max_wait": 5}}, "revocation.max_wait"),
    ],
)
def test_a_restart_only_change_is_refused_and_the_old_config_kept(
    tmp_path: Path, change: dict[str, Any], key: str
) -> None:
    async def scenario(service: BrokerService, broker: Broker) -> None:
        before = service.cfg
        with pytest.raises(ConfigError) as err:
            await service.reload(_config(tmp_path, entries=[B], tokens={"ttl": 60}, **change))
        assert err.value.key == key
        assert service.cfg is before and broker.cfg is before
        assert (_subject(broker, 1), _subject(broker, 2)) == ("spiffe://t/a", None)

    _running(tmp_path, scenario)


def test_runtime_entries_are_kept_across_reload_and_restart(tmp_path: Path) -> None:
    async def add(service: BrokerService, broker: Broker) -> None:
        result = await broker.change_entries({"action": "add", "entry": C}, actor_uid=0)
        assert result["spiffe_id"] == "spiffe://t/c" and result["entries"] == 2
        assert _subject(broker, 3) == "spiffe://t/c"
        # A reload replaces the file's entries and keeps the added one.
        await service.reload(_config(tmp_path, entries=[B]))
        assert [_subject(broker, u) for u in (1, 2, 3)] == [None, "spiffe://t/b", "spiffe://t/c"]
        sources = {e["spiffe_id"]: e["source"] for e in broker.entries.listing()}
        assert sources == {"spiffe://t/b": "config", "spiffe://t/c": "runtime"}
        # A reloaded file whose entry takes the added entry's selectors is refused.
        with pytest.raises(ConfigError):
            await service.reload(_config(tmp_path, entries=[{**B, "selectors": ["unix:uid:3"]}]))
        assert _subject(broker, 3) == "spiffe://t/c"

    _running(tmp_path, add)

    async def after_restart(service: BrokerService, broker: Broker) -> None:
        assert _subject(broker, 3) == "spiffe://t/c", "kept in state_dir"
        result = await broker.change_entries(
            {"action": "remove", "spiffe_id": "spiffe://t/c"}, actor_uid=0
        )
        assert result["removed"] == 1 and _subject(broker, 3) is None
        with pytest.raises(OAuthError, match="configuration file"):
            await broker.change_entries(
                {"action": "remove", "spiffe_id": "spiffe://t/a"}, actor_uid=0
            )

    _running(tmp_path, after_restart)
    assert (tmp_path / "state" / "entries.json").read_text().strip() == "[]"


@pytest.mark.parametrize(
    "doc",
    [
        {"action": "add", "entry": {**C, "selectors": ["unix:path:/bin/sh"]}},  # no uid/gid
        {"action": "add", "entry": {**C, "selectors": ["unix:uid:1"]}},  # A's selectors
        {"action": "add"},
        {"action": "rename"},
        None,
    ],
)
def test_a_bad_entry_change_is_refused_and_nothing_changes(
    tmp_path: Path, doc: dict[str, Any] | None
) -> None:
    async def scenario(service: BrokerService, broker: Broker) -> None:
        with pytest.raises(OAuthError) as err:
            await broker.change_entries(doc, actor_uid=0)
        assert err.value.error == "invalid_request"
        assert [e["spiffe_id"] for e in broker.entries.listing()] == ["spiffe://t/a"]
        assert not (tmp_path / "state" / "entries.json").exists()

    _running(tmp_path, scenario)


def test_every_setting_is_either_reloaded_or_restart_only() -> None:
    """A new BrokerConfig field must be classified: otherwise a reload would accept a change
    to it that the running broker never applies."""
    import dataclasses

    from sidecar.broker.service import RESTART_ONLY

    # Swapped by use_config; issuer and keys are compared on their own (derived issuer,
    # retire_grace).
    reloaded = {"token_ttl", "wit_ttl", "registry", "high_privilege_audiences", "issuer", "keys"}
    fields = {f.name for f in dataclasses.fields(BrokerConfig)}
    assert fields - reloaded == set(RESTART_ONLY)
