"""Issuer outage manners, over real sockets in one process: a dead issuer (the broker's
attestation socket answering 503) behind a TokenSource and an EgressProxy, with an app sending
requests back to back. On-demand fetches must keep to the refresh backoff (counted at the
issuer), and the log must stay bounded: one WARNING per condition per interval, with a count.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.egress.config import parse_egress_config
from sidecar.egress.proxy import EgressProxy
from sidecar.identity.attestors import UnixAttestor
from sidecar.identity.key import generate_signer
from sidecar.identity.metrics import IdentityMetrics
from sidecar.identity.schedule import RefreshPolicy
from sidecar.identity.source import TokenSource

ORDERS = "spiffe://demo.local/ns/shop/sa/orders"
# Backoff ceilings 0.05, 0.1, 0.2, 0.4, 0.4 … s; the draw is fixed at 1 so each delay IS the
# ceiling. demand_interval is far shorter: the old code fetched on demand every 0.02 s.
POLICY = RefreshPolicy(
    backoff_initial=0.05, backoff_max=0.4, demand_interval=0.02, request_wait=0.2
)
DURATION = 2.5
LOG_INTERVAL = 1.0


class DeadIssuer:
    """The broker's attestation endpoint while the issuer behind it is down: 503 to all."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hits: list[float] = []
        self._runner: web.AppRunner | None = None

    async def token(self, _: web.Request) -> web.Response:
        self.hits.append(time.monotonic())
        return web.json_response({"error": "temporarily_unavailable"}, status=503)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self.token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.path)).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def _outage(tmp: Path) -> tuple[DeadIssuer, list[int]]:
    issuer = DeadIssuer(tmp / "attest.sock")
    await issuer.start()
    signer = generate_signer()
    tokens = TokenSource(
        UnixAttestor(str(issuer.path), signer),
        POLICY,
        [ORDERS],
        metrics=IdentityMetrics(CollectorRegistry()),
        draw=lambda: 1.0,
        log_interval=LOG_INTERVAL,
    )
    cfg = parse_egress_config(
        {
            "upstreams": [
                {
                    "name": "orders",
                    "listen": "127.0.0.1:0",
                    "upstream": "http://127.0.0.1:9",  # never reached: there is no token
                    "audience": ORDERS,
                }
            ]
        }
    )
    proxy = EgressProxy(
        cfg, tokens=tokens, signer=signer, registry=CollectorRegistry(), log_interval=LOG_INTERVAL
    )
    statuses: list[int] = []
    await tokens.start()
    await proxy.start()
    try:
        url = f"http://127.0.0.1:{proxy.ports['orders']}/orders/1"
        deadline = time.monotonic() + DURATION

        async def app(session: aiohttp.ClientSession) -> None:
            while time.monotonic() < deadline:
                async with session.get(url) as resp:
                    await resp.read()
                    statuses.append(resp.status)

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(app(session) for _ in range(4)))
    finally:
        await proxy.stop()
        await tokens.close()
        await issuer.close()
    return issuer, statuses


def test_demand_fetches_keep_to_the_backoff_and_warnings_are_rate_limited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    issuer, statuses = asyncio.run(_outage(tmp_path))

    assert len(statuses) > 100, "the app sent requests back to back"
    assert set(statuses) == {503}, "no token, no request upstream"
    hits = issuer.hits
    gaps = [b - a for a, b in itertools.pairwise(hits)]
    expected = [min(0.4, 0.05 * 2**n) for n in range(len(gaps))]
    # Each attempt waits out the backoff after the failure before it (a little timer slack).
    early = [
        (i, round(g, 3), e)
        for i, (g, e) in enumerate(zip(gaps, expected, strict=True))
        if g < e - 0.01
    ]
    assert not early, f"attempts sooner than the backoff (index, gap, backoff): {early}"
    # 0.05 + 0.1 + 0.2 = 0.35 s for the first four attempts, then one per 0.4 s.
    most = 4 + (DURATION - 0.35) / 0.4 + 1
    assert 4 <= len(hits) <= most, (len(hits), most)

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    by_logger = {
        name: [r.getMessage() for r in warnings if r.name == name]
        for name in ("sidecar.identity.source", "sidecar.egress.proxy")
    }
    # One key each (the audience; the upstream and reason): at most one line per interval,
    # plus the final summary of what was held back.
    for name, lines in by_logger.items():
        assert 1 <= len(lines) <= DURATION / LOG_INTERVAL + 2, (name, lines)
    counted = [m for m in by_logger["sidecar.egress.proxy"] if "(repeated " in m]
    assert counted, by_logger["sidecar.egress.proxy"]
    assert "no_valid_token" in counted[0] and "times in the last 1 s)" in counted[0], counted
    assert any("(repeated " in m for m in by_logger["sidecar.identity.source"]), by_logger
    assert len(warnings) == sum(len(v) for v in by_logger.values()), "no other warnings"
