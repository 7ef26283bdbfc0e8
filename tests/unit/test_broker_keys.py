"""Signing keys, rotation schedule and token minting (sidecar.broker.keys / issuance): the
clock is a number passed in; tokens are checked with the package's own verifier here (the
integration tests check them with jwcrypto too)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sidecar.broker import service
from sidecar.broker.config import parse_broker_config
from sidecar.broker.issuance import mint
from sidecar.broker.keys import (
    SIGNING_ALGORITHMS,
    KeyRing,
    Schedule,
    generate_private_key,
    make_signing_key,
)
from sidecar.jose.b64 import b64url_decode
from sidecar.jose.jwks import KeyStore
from sidecar.jose.rfc7517_jwk import import_jwks
from sidecar.jose.rfc7638_thumbprint import jwk_thumbprint
from sidecar.jose.rfc9068_access_token import IssuerPolicy, verify_access_token

NOW = 1_700_000_000.0
ISS = "http://127.0.0.1:8443"
JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"


def ring(rotate_every: float = 100, prepublish: float = 30, retain_for: float = 50) -> KeyRing:
    schedule = Schedule("ES256", rotate_every, prepublish, retain_for)
    return KeyRing(schedule, make_signing_key(generate_private_key("ES256"), "ES256", NOW), NOW)


def kids(r: KeyRing) -> list[str]:
    return [k["kid"] for k in json.loads(r.jwks_bytes())["keys"]]


def test_kid_is_the_rfc7638_thumbprint_and_private_key_is_not_in_repr() -> None:
    key = make_signing_key(generate_private_key("ES256"), "ES256", NOW)
    public = {k: v for k, v in key.public_jwk.items() if k in ("kty", "crv", "x", "y")}
    assert key.kid == jwk_thumbprint(public)
    assert key.public_jwk["use"] == "sig" and key.public_jwk["alg"] == "ES256"
    assert "d" not in key.public_jwk
    assert "private" not in repr(key) and "EllipticCurvePrivateKey" not in repr(key)
    header = json.loads(b64url_decode(key.header64))
    assert header == {"alg": "ES256", "kid": key.kid, "typ": "at+jwt"}


def test_rotation_prepublishes_then_activates_then_retires() -> None:
    r = ring(rotate_every=100, prepublish=30, retain_for=50)
    first = r.active.kid
    assert not r.next_key_due(NOW + 69.9)
    assert r.next_key_due(NOW + 70)
    event = r.publish_next(
        make_signing_key(generate_private_key("ES256"), "ES256", NOW + 70), NOW + 70
    )
    assert event.event == "key_published"
    second = event.kid
    assert kids(r) == [first, second], "the next key is published..."
    assert r.active.kid == first, "...but does not sign yet"
    assert r.advance(NOW + 99.9) == []
    assert r.next_wakeup(NOW + 99.9) == pytest.approx(0.1)
    events = r.advance(NOW + 100)
    assert [e.event for e in events] == ["key_activated", "key_retired"]
    assert r.active.kid == second
    assert kids(r) == [second, first], "the retired key stays published"
    assert r.advance(NOW + 149.9) == []
    events = r.advance(NOW + 150)
    assert [(e.event, e.kid) for e in events] == [("key_removed", first)]
    assert kids(r) == [second]


def test_a_late_next_key_still_gets_its_full_prepublication() -> None:
    """If the next key is published late (the process was busy, or just restarted), it still
    waits ``prepublish`` seconds before signing."""
    r = ring(rotate_every=100, prepublish=30)
    late = NOW + 95
    r.publish_next(make_signing_key(generate_private_key("ES256"), "ES256", late), late)
    assert r.next is not None and r.next.activates_at == late + 30
    assert r.advance(NOW + 100) == []


def test_no_rotation_when_disabled() -> None:
    r = ring(rotate_every=0)
    assert not r.next_key_due(NOW + 10**9)
    assert r.advance(NOW + 10**9) == []
    assert Schedule("ES256", 0, 0, 300).published_keys_bound() == 1
    assert Schedule("ES256", 10, 5, 25).published_keys_bound() == 5


def test_jwks_version_changes_with_content() -> None:
    r = ring()
    v0, body0 = r.version, r.jwks_bytes()
    assert r.jwks_bytes() is body0, "cached while unchanged"
    r.publish_next(make_signing_key(generate_private_key("ES256"), "ES256", NOW + 70), NOW + 70)
    assert r.version != v0 and r.jwks_bytes() != body0


@pytest.mark.parametrize("alg", SIGNING_ALGORITHMS)
def test_minted_tokens_verify_for_every_algorithm(alg: str) -> None:
    key = make_signing_key(generate_private_key(alg), alg, NOW)
    minted = mint(
        key,
        issuer=ISS,
        subject="spiffe://t/a",
        audiences=["spiffe://t/b"],
        jkt=JKT,
        now=NOW,
        ttl=300,
    )
    store = KeyStore()
    store.replace(ISS, import_jwks({"keys": [key.public_jwk]}))
    verified = verify_access_token(
        minted.token,
        issuers={ISS: IssuerPolicy(ISS, frozenset({alg}))},
        keys=store,
        audiences=frozenset({"spiffe://t/b"}),
        now=NOW + 1,
        leeway=0,
        max_bytes=8192,
    )
    assert verified.subject == verified.client_id == "spiffe://t/a"
    assert verified.jkt == JKT and verified.kid == key.kid and verified.alg == alg
    assert verified.expires_at == NOW + 300 and minted.expires_in == 300


def test_claims_shape_audience_list_and_not_after() -> None:
    key = make_signing_key(generate_private_key("ES256"), "ES256", NOW)
    one = mint(key, issuer=ISS, subject="spiffe://t/a", audiences=["x"], jkt=JKT, now=NOW, ttl=300)
    two = mint(
        key,
        issuer=ISS,
        subject="spiffe://t/a",
        audiences=["x", "y"],
        jkt=JKT,
        now=NOW + 0.7,
        ttl=300,
        not_after=NOW + 42,
    )
    claims1 = json.loads(b64url_decode(one.token.split(".")[1]))
    claims2 = json.loads(b64url_decode(two.token.split(".")[1]))
    assert set(claims1) == {"iss", "sub", "aud", "iat", "nbf", "exp", "jti", "client_id", "cnf"}
    assert claims1["aud"] == "x" and claims2["aud"] == ["x", "y"]
    assert claims2["exp"] == NOW + 42 and two.expires_in == 42
    assert claims1["jti"] != claims2["jti"] and len(b64url_decode(claims1["jti"])) == 16


def test_a_failed_key_generation_is_counted_and_retried(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """M10: the rotation task survives a failed generation (the active key stays), counts it,
    and retries; before, the exception ended the task and rotation silently stopped."""
    cfg = parse_broker_config({"audit": {"path": str(tmp_path / "audit.log")}})
    registry = CollectorRegistry()
    svc = service.BrokerService(cfg, registry, clock=lambda: NOW + 80)  # next key is due
    r = ring()
    active = r.active.kid
    attempts: list[str] = []

    def flaky(alg: str) -> Any:
        attempts.append(alg)
        if len(attempts) == 1:
            raise OSError("no entropy")
        return generate_private_key(alg)

    monkeypatch.setattr(service, "generate_private_key", flaky)
    monkeypatch.setattr(service, "ROTATION_RETRY", 0.01)

    async def scenario() -> None:
        task = asyncio.create_task(svc._rotate(r))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(r.published()) == 2:
                break
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    svc.audit.close()

    def count(outcome: str) -> float | None:
        labels = {"outcome": outcome}
        return registry.get_sample_value("sidecar_broker_key_rotations_total", labels)

    assert (count("failed"), count("ok")) == (1, 1)
    assert r.active.kid == active and len(r.published()) == 2
