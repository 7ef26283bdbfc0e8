"""Revoked subjects and token ids, as published by the issuer and followed by verifiers.

``RevocationPoller`` keeps a ``RevocationList`` current. It long-polls (``If-None-Match`` +
``Prefer: wait=N``): an issuer that honours the wait (``Preference-Applied``) holds the request
until the list changes, so a revocation arrives within a round trip while an idle verifier sends
one request per ``wait`` seconds. Against an issuer that answers at once without
``Preference-Applied`` it polls every ``interval``. Fail-safe: a failed request never clears
the list (a revocation once seen is never forgotten by an outage); errors back off with jitter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from sidecar import backoff
from sidecar.revocation_wire import CHANGED_HEADER, wait_preference
from sidecar.tls_settings import TLSClient, request_options

log = logging.getLogger(__name__)

MAX_REVOCATION_BYTES = 4 * 1024 * 1024
#: Least time between two long-poll requests: bounds the rate against an issuer that claims to
#: hold requests but answers at once, or a list that changes all the time.
MIN_SPACING = 0.25
#: Retries after errors: from this, doubling, up to max(interval, RETRY_CAP), with jitter.
RETRY_FIRST = 0.5
RETRY_CAP = 10.0


class RevocationList:
    """Held in memory and replaced whole on each change, so a check is two set look-ups."""

    def __init__(self) -> None:
        self.subjects: frozenset[str] = frozenset()
        self.jtis: frozenset[str] = frozenset()
        self.version: str | None = None

    def replace(
        self, *, subjects: frozenset[str], jtis: frozenset[str], version: str | None
    ) -> None:
        self.subjects, self.jtis, self.version = subjects, jtis, version

    def is_revoked(self, subject: str, jti: str | None) -> bool:
        return subject in self.subjects or (jti is not None and jti in self.jtis)

    def __len__(self) -> int:
        return len(self.subjects) + len(self.jtis)


def next_delay(
    *, ok: bool, long_poll: bool, elapsed: float, failures: int, interval: float, jitter: float
) -> float:
    """Seconds to sleep before the next request. ``jitter`` is in [0, 1)."""
    if not ok:
        # Equal jitter: never retry at once; a long interval is never undercut by the cap.
        cap = max(interval, RETRY_CAP)
        return backoff.delay(failures, first=RETRY_FIRST, cap=cap, draw=jitter, spread=0.5)
    if long_poll:
        return max(0.0, MIN_SPACING - elapsed)
    return interval


class RevocationPoller:
    """Follows one issuer's revocation list into ``target``."""

    def __init__(
        self,
        url: str,
        target: RevocationList,
        *,
        interval: float,
        wait: int,
        clock: Callable[[], float] = time.time,
        on_propagated: Callable[[float], None] | None = None,
        tls: TLSClient | None = None,
    ) -> None:
        self.url = url
        self._tls = tls
        self.target = target
        self.interval = interval
        self.wait = wait
        self.clock = clock
        self.on_propagated = on_propagated
        self.requests = 0
        self.heard_at: float | None = None  # monotonic time of the last answer (200 or 304)
        self._started = time.monotonic()

    def silence(self) -> float:
        """Seconds since the issuer last answered (since start if it never did)."""
        return time.monotonic() - (self.heard_at if self.heard_at is not None else self._started)

    async def run(self) -> None:
        # An answer may be held for `wait` seconds; beyond that plus a margin the issuer is gone.
        timeout = aiohttp.ClientTimeout(total=self.wait + max(1.0, self.interval))
        failures = 0
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                sent = time.monotonic()
                long_poll = False
                try:
                    long_poll = await self._request(session)
                except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
                    failures += 1
                    if failures == 1 or failures % 10 == 0:  # an outage logs a few lines
                        log.warning(
                            "revocation list %s: %s %s (%d failure(s) in a row; last list kept)",
                            self.url,
                            type(exc).__name__,
                            str(exc)[:200],
                            failures,
                        )
                else:
                    if failures:
                        log.info("revocation list %s: reachable again", self.url)
                    failures = 0
                delay = next_delay(
                    ok=failures == 0,
                    long_poll=long_poll,
                    elapsed=time.monotonic() - sent,
                    failures=failures,
                    interval=self.interval,
                    jitter=random.random(),
                )
                await asyncio.sleep(delay)

    async def _request(self, session: aiohttp.ClientSession) -> bool:
        """One request; True when the issuer honoured the long-poll wait."""
        headers = {"Prefer": f"wait={self.wait}"} if self.wait else {}
        if self.target.version:
            headers["If-None-Match"] = self.target.version
        self.requests += 1
        async with session.get(self.url, headers=headers, **request_options(self._tls)) as resp:
            if resp.status == 200:
                doc = json.loads(await resp.content.read(MAX_REVOCATION_BYTES))
                self._apply(doc, resp.headers.get("ETag"), resp.headers.get(CHANGED_HEADER))
            elif resp.status != 304:
                raise ValueError(f"HTTP {resp.status}")
            self.heard_at = time.monotonic()
            return bool(wait_preference(resp.headers.getall("Preference-Applied", ())))

    def _apply(self, doc: Any, etag: str | None, changed: str | None) -> None:
        first = self.target.version is None
        self.target.replace(
            subjects=_str_set(doc, "subjects"), jtis=_str_set(doc, "jtis"), version=etag
        )
        # The first list is not a change we waited for: its age says nothing about propagation.
        if first or self.on_propagated is None or changed is None:
            return
        try:
            changed_at = float(changed)
        except ValueError:
            return
        if math.isfinite(changed_at):
            self.on_propagated(max(0.0, self.clock() - changed_at))


def _str_set(doc: Any, key: str) -> frozenset[str]:
    """A list of strings from the document; anything else is refused (ValueError) so that a
    garbled answer never replaces the list in force with an empty one."""
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"the revocation list has no list of strings {key!r}")
    return frozenset(value)
