"""A replay store shared by the replicas of one service, in Redis: one script per proof.

The script inserts the proof's key with ``SET key 1 NX PX ttl`` (atomic: of concurrent
inserts of one key exactly one succeeds) and, in the same step, reads the store's epoch marker:
since when this Redis holds every key inserted. A Redis that lost its data (restart without
persistence, flush, fail-over to an empty replica) has lost the marker too; the first insert
after that sets it to now. A Redis that restarted *with* persistence has forgotten our script
(``NOSCRIPT``): the caller then re-sends it with "reset", which moves the marker to now, since
a snapshot may lack the last keys. The authorizer refuses proofs that predate the epoch.

One round trip per proof; any Redis error or a reply slower than ``timeout`` raises
ReplayStoreUnavailable, and the authorizer fails closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from sidecar.errors import ReplayStoreUnavailable

# KEYS[1] the proof's key, KEYS[2] the epoch marker; ARGV[1] ttl in ms ("0": only read the
# epoch), ARGV[2] the caller's clock, ARGV[3] "1" to reset the epoch to at least ARGV[2].
_SCRIPT = """
local epoch = redis.call('GET', KEYS[2])
if not epoch or (ARGV[3] == '1' and tonumber(ARGV[2]) > tonumber(epoch)) then
  epoch = ARGV[2]
  redis.call('SET', KEYS[2], epoch)
end
if ARGV[1] == '0' then
  return {0, epoch}
end
local fresh = redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1])
return {fresh and 1 or 0, epoch}
"""
_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()  # Redis names scripts by their SHA-1


class RedisReplayStore:
    def __init__(self, url: str, *, prefix: str = "wis:dpop:", timeout: float = 0.05) -> None:
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, max_connections=64
        )
        self._prefix = prefix
        self._marker = prefix + "epoch"
        self._timeout = timeout
        self._epoch: float | None = None  # unknown until Redis first answers

    def size(self) -> int:
        return -1  # not known locally; Redis reports its own memory use

    @property
    def epoch(self) -> float:
        return math.inf if self._epoch is None else self._epoch

    def _key(self, key: str) -> str:
        # Fixed-length keys: a jti is at most 256 chars but there is no reason to store it.
        return self._prefix + hashlib.sha256(key.encode()).hexdigest()[:40]

    async def _run(self, key: str, ttl_ms: int, now: float) -> bool:
        keys_args: tuple[Any, ...] = (key, self._marker, ttl_ms, repr(now))
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    reply = await self._redis.evalsha(_SHA, 2, *keys_args, "0")
                except NoScriptError:
                    # This Redis never saw the script, or restarted and may have restored an
                    # old snapshot: its keys are not to be trusted before now.
                    reply = await self._redis.eval(_SCRIPT, 2, *keys_args, "1")
        except (RedisError, OSError, TimeoutError) as exc:
            raise ReplayStoreUnavailable(f"redis: {type(exc).__name__}") from None
        fresh, epoch = reply
        # The marker only moves forward; keep the latest seen so a slower, older answer
        # never takes it back.
        self._epoch = float(epoch) if self._epoch is None else max(self._epoch, float(epoch))
        return bool(fresh)

    async def check_and_insert(self, key: str, now: float, ttl: float) -> bool:
        return await self._run(self._key(key), max(1, int(ttl * 1000)), now)

    async def load_epoch(self, now: float) -> None:
        """Learn the epoch (setting it to ``now`` on an empty Redis) without inserting."""
        await self._run(self._marker, 0, now)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(1.0):
                return bool(await self._redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self._redis.aclose()
