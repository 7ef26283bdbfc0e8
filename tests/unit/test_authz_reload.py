"""``AuthzService.reload``: a new configuration is swapped in whole (the check guards point at a
new authorizer; verified tokens stay cached when the token rules did not change; a removed
issuer's keys go), and a change only a restart can make is refused with nothing changed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from sidecar.authz.command import reloaded_authz
from sidecar.authz.config import parse_authz_config
from sidecar.authz.service import AuthzService
from sidecar.errors import ConfigError
from sidecar.jose.rfc7517_jwk import jwks_json, public_jwk_dict

FRONTEND = "spiffe://demo.local/ns/shop/sa/frontend"


def _jwks(path: Path) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_text(jwks_json([public_jwk_dict(key, alg="ES256", kid="k1")]))
    return str(path)


def _section(tmp: Path, issuers: list[str], **extra: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "audience": "spiffe://demo.local/ns/shop/sa/orders",
        "issuers": [
            {"issuer": iss, "jwks_file": _jwks(tmp / f"jwks-{i}.json")}
            for i, iss in enumerate(issuers)
        ],
        "grpc": {"listen": "127.0.0.1:9191"},
        "nonce": {"secret": "unit-test-nonce-secret"},
        "rules": [{"name": "orders", "principals": [FRONTEND], "paths": ["/orders"]}],
    }
    section.update(extra)
    return section


def test_a_policy_change_swaps_the_authorizer_and_keeps_verified_tokens(tmp_path: Path) -> None:
    section = _section(tmp_path, ["https://a.example"])
    service = AuthzService(parse_authz_config(section), CollectorRegistry())
    guard = service._guard("http")
    running = service.authorizer
    section["rules"] = [{"name": "all", "principals": [FRONTEND], "paths": ["/"]}]
    asyncio.run(service.reload(reloaded_authz(section, service.cfg)))
    assert service.authorizer is not running
    assert guard.authorizer is service.authorizer  # checks from now on see the new policy
    assert service.authorizer.policy.allowing_rule(FRONTEND, "GET", "/reports") is not None
    assert running.policy.allowing_rule(FRONTEND, "GET", "/reports") is None
    assert service.authorizer.token_cache is running.token_cache
    assert service.authorizer.nonces is running.nonces  # same secret: nonces stay valid

    section["audience"] = "spiffe://demo.local/ns/shop/sa/other"  # other token rules
    asyncio.run(service.reload(reloaded_authz(section, service.cfg)))
    assert service.authorizer.token_cache is not running.token_cache


def test_a_restart_only_change_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    section = _section(tmp_path, ["https://a.example"])
    service = AuthzService(parse_authz_config(section), CollectorRegistry())
    cfg, authorizer = service.cfg, service.authorizer
    moved = {
        **section,
        "grpc": {"listen": "127.0.0.1:9999"},
        "replay": {"capacity": 5000},
        "rules": [{"name": "all", "principals": [FRONTEND], "paths": ["/"]}],
    }
    with pytest.raises(ConfigError) as info:
        asyncio.run(service.reload(reloaded_authz(moved, service.cfg)))
    assert "needs restart: authz.grpc.listen, authz.replay.capacity" in str(info.value)
    assert (service.cfg, service.authorizer) == (cfg, authorizer)


def test_a_removed_issuer_loses_its_keys_and_an_added_one_is_loaded(tmp_path: Path) -> None:
    service = AuthzService(
        parse_authz_config(_section(tmp_path, ["https://a.example", "https://b.example"])),
        CollectorRegistry(),
    )

    async def scenario() -> None:
        await service._first_load(service._all_sources())
        assert service.keys.has_issuer("https://b.example")
        kept = service.sources["https://a.example"]
        new_dir = tmp_path / "new"
        new_dir.mkdir()
        section = _section(new_dir, ["https://a.example", "https://c.example"])
        section["issuers"][0] = {"issuer": "https://a.example", "jwks_file": kept.location.file}
        await service.reload(reloaded_authz(section, service.cfg))
        assert service.sources["https://a.example"] is kept  # unchanged: not refetched
        assert sorted(service.sources) == ["https://a.example", "https://c.example"]
        assert not service.keys.has_issuer("https://b.example")  # no longer trusted
        assert service.keys.has_issuer("https://c.example")  # loaded before the swap
        assert list(service._periodic) == [service.sources["https://c.example"]]  # refreshed
        await service.stop()

    asyncio.run(scenario())
