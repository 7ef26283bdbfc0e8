"""JwksSource with a fake clock: the unknown-kid refresh is rate-limited without sleeping."""

from __future__ import annotations

import asyncio
from typing import Any

from factory import es_issuer

from sidecar.jose.jwks import KeyStore
from sidecar.jwks_source import JwksLocation, JwksSource


def test_unknown_kid_refresh_waits_min_refresh_interval_on_the_injected_clock() -> None:
    issuer = es_issuer()
    fetches = 0

    async def fetch() -> Any:
        nonlocal fetches
        fetches += 1
        return {"keys": [issuer.jwk]}

    now = 1000.0
    source = JwksSource(
        JwksLocation(issuer.iss),
        KeyStore(),
        min_refresh_interval=10.0,
        fetch_document=fetch,
        clock=lambda: now,
    )

    async def scenario() -> None:
        nonlocal now
        assert source.may_refresh()  # never fetched
        assert await source.refresh("startup")
        assert fetches == 1
        now += 9.999  # inside the interval: an unknown kid may not trigger a fetch
        assert not source.may_refresh()
        now += 0.001
        assert source.may_refresh()
        assert not await source.refresh("unknown_kid")  # same keys: unchanged
        assert fetches == 2
        assert not source.may_refresh()  # the interval runs from the last attempt

    asyncio.run(scenario())
