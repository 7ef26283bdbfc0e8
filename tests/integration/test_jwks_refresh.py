"""JWKS sources against a real HTTP server: OIDC discovery, refresh on an unknown kid (rate
limited), withdrawn keys, and an issuer that is down."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.authz.config import parse_authz_config
from sidecar.authz.decision import Allow, Deny, RequestView
from sidecar.authz.service import AuthzService
from tests.integration.issuer import AUDIENCE, DevIssuer, client_signer


class IssuerServer:
    """Serves discovery and a JWKS that the test can change; counts fetches."""

    def __init__(self) -> None:
        self.keys: list[DevIssuer] = []
        self.jwks_fetches = 0
        self.up = True
        self.port = 0
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        async def discovery(_: web.Request) -> web.Response:
            if not self.up:
                return web.Response(status=503)
            return web.json_response({"issuer": self.url, "jwks_uri": self.url + "/jwks"})

        async def jwks(_: web.Request) -> web.Response:
            self.jwks_fetches += 1
            if not self.up:
                return web.Response(status=503)
            import json

            keys = [json.loads(k.jwks())["keys"][0] for k in self.keys]
            return web.json_response({"keys": keys})

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", jwks)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def _service(issuer_url: str, **extra: Any) -> AuthzService:
    cfg = parse_authz_config(
        {
            "audience": AUDIENCE,
            "issuers": [{"issuer": issuer_url, "discovery": True, **extra}],
            "grpc": {"enabled": False},
            "http": {"enabled": False},
            "unknown_kid_wait": 2.0,
            "rules": [{"name": "all", "principals": ["**"], "paths": ["/"]}],
        }
    )
    return AuthzService(cfg, CollectorRegistry())


async def _ready(svc: AuthzService) -> None:
    """Until /readyz would say ready: keys loaded and the replay store's restart guard over
    (proofs signed in the first future_leeway seconds after start are refused)."""
    for _ in range(100):
        if svc.readiness()[0]:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(svc.readiness()[1])


def _view(key: DevIssuer) -> RequestView:
    signer = client_signer()
    token = key.token(jkt=signer.thumbprint)
    url = "http://orders.local/orders/1"
    proof = signer.proof(method="GET", url=url, now=time.time(), access_token=token)
    return RequestView(
        "GET",
        "http",
        "orders.local",
        "/orders/1",
        {"authorization": f"DPoP {token}", "dpop": proof},
    )


def test_discovery_unknown_kid_refresh_and_rate_limit() -> None:
    async def scenario() -> None:
        server = IssuerServer()
        await server.start()
        first = DevIssuer(server.url, kid="k1")
        server.keys = [first]
        svc = _service(server.url, min_refresh_interval=1)
        try:
            await svc.start()
            await _ready(svc)
            assert isinstance(await svc.authorizer.decide(_view(first)), Allow)

            # The issuer rotates: a token with a new kid triggers one refresh, then verifies.
            second = DevIssuer(server.url, kid="k2")
            server.keys = [first, second]
            # Past min_refresh_interval since the start-up fetch: the source's clock moves on
            # (the rate limit reads it, not the wall), no sleep.
            source = svc.sources[server.url]
            source.clock = lambda: time.monotonic() + 1.1
            fetches = server.jwks_fetches
            assert isinstance(await svc.authorizer.decide(_view(second)), Allow)
            assert server.jwks_fetches == fetches + 1

            # Another unknown kid within min_refresh_interval: no fetch, denied unknown_key.
            third = DevIssuer(server.url, kid="k3")
            server.keys = [first, second, third]
            decision = await svc.authorizer.decide(_view(third))
            assert isinstance(decision, Deny) and decision.reason.value == "unknown_key"
            assert server.jwks_fetches == fetches + 1
        finally:
            await svc.stop()
            await server.stop()

    asyncio.run(scenario())


def test_withdrawn_key_stops_verifying_and_issuer_outage_keeps_last_keys() -> None:
    async def scenario() -> None:
        server = IssuerServer()
        await server.start()
        old, new = DevIssuer(server.url, kid="old"), DevIssuer(server.url, kid="new")
        server.keys = [old, new]
        svc = _service(server.url, min_refresh_interval=0)
        try:
            await svc.start()
            await _ready(svc)
            assert isinstance(await svc.authorizer.decide(_view(old)), Allow)
            server.keys = [new]
            await svc.sources[server.url].refresh()
            decision = await svc.authorizer.decide(_view(old))
            assert isinstance(decision, Deny) and decision.reason.value == "unknown_key"

            server.up = False
            assert not await svc.sources[server.url].refresh("periodic")
            assert isinstance(await svc.authorizer.decide(_view(new)), Allow)
            # M10: every trigger's outcome is counted, failures included.
            for trigger, outcome in (
                ("startup", "changed"),
                ("demand", "changed"),
                ("periodic", "failed"),
            ):
                labels = {"trigger": trigger, "outcome": outcome}
                got = svc.metrics.registry.get_sample_value("sidecar_jwks_refreshes_total", labels)
                assert got == 1, labels
        finally:
            await svc.stop()
            await server.stop()

    asyncio.run(scenario())


def test_issuer_down_at_start_is_not_ready_and_denies() -> None:
    async def scenario() -> None:
        server = IssuerServer()
        await server.start()
        server.up = False
        key = DevIssuer(server.url)
        svc = _service(server.url, min_refresh_interval=0)
        try:
            await svc.start()
            ready, why = svc.readiness()
            assert not ready and server.url in why
            decision = await svc.authorizer.decide(_view(key))
            assert isinstance(decision, Deny) and decision.reason.value == "unknown_key"
        finally:
            await svc.stop()
            await server.stop()

    asyncio.run(scenario())
