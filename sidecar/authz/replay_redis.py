"""A replay store shared by the replicas of one service: Redis ``SET key 1 NX PX ttl``.

One round trip per proof; any Redis error or a reply slower than ``timeout`` raises
ReplayStoreUnavailable, and the authorizer fails closed.
"""

from __future__ import annotations

import asyncio
import hashlib

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sidecar.errors import ReplayStoreUnavailable


class RedisReplayStore:
    def __init__(self, url: str, *, prefix: str = "wis:dpop:", timeout: float = 0.05) -> None:
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, max_connections=64
        )
        self._prefix = prefix
        self._timeout = timeout

    def size(self) -> int:
        return -1  # not known locally; Redis reports its own memory use

    def _key(self, key: str) -> str:
        # Fixed-length keys: a jti is at most 256 chars but there is no reason to store it.
        return self._prefix + hashlib.sha256(key.encode()).hexdigest()[:40]

    async def check_and_insert(self, key: str, now: float, ttl: float) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                ok = await self._redis.set(
                    self._key(key), b"1", nx=True, px=max(1, int(ttl * 1000))
                )
        except (RedisError, OSError, TimeoutError) as exc:
            raise ReplayStoreUnavailable(f"redis: {type(exc).__name__}") from None
        return bool(ok)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(1.0):
                return bool(await self._redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self._redis.aclose()
