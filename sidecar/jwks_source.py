"""JWK Set sources (RFC 7517 §5): load one issuer's keys into a key store and keep them fresh.

A source loads one issuer's keys from a file, a URL, or OIDC discovery
(``{issuer}/.well-known/openid-configuration`` → ``jwks_uri``, OpenID Connect Discovery §4);
parsing and the store stay in :mod:`sidecar.jose`. The store is swapped atomically;
verification never waits on I/O except the rate-limited refresh on an unknown ``kid`` that the
authorizer may await with a short deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from sidecar import backoff
from sidecar.errors import SidecarError
from sidecar.jose.jwks import KeySink
from sidecar.jose.rfc7517_jwk import JWKError, PublicJWK, import_jwks
from sidecar.observability.logsafe import logfmt_value
from sidecar.tls_settings import TLSClient, request_options

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 256 * 1024
#: While an issuer has no key yet: retry after 1 s, doubling up to 30 s, with jitter.
NO_KEY_RETRY_FIRST = 1.0
NO_KEY_RETRY_CAP = 30.0


class JwksUnavailable(SidecarError):
    """A key set could not be fetched or parsed."""

    code = "jwks_unavailable"


@dataclass(frozen=True, slots=True)
class JwksLocation:
    issuer: str
    file: str | None = None
    uri: str | None = None
    discovery: bool = False
    #: Trust for https fetches (None: the system's CAs, no client certificate).
    tls: TLSClient | None = None


async def _get_json(session: aiohttp.ClientSession, url: str, tls: TLSClient | None) -> Any:
    async with session.get(url, allow_redirects=False, **request_options(tls)) as resp:
        if resp.status != 200:
            raise JwksUnavailable(f"GET {url}: HTTP {resp.status}")
        body = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
        if len(body) > MAX_DOCUMENT_BYTES:
            raise JwksUnavailable(f"GET {url}: document larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError:
        raise JwksUnavailable(f"GET {url}: not JSON") from None


class JwksSource:
    """Keeps one issuer's keys in a KeyStore fresh: at start, periodically, and on demand
    (an unknown ``kid``) no more often than ``min_refresh_interval``.

    ``importer`` turns the fetched document into keys (a SPIFFE bundle keeps each key's
    ``use``); ``fetch_document`` replaces the file/URL fetch (the SPIFFE Workload API)."""

    def __init__(
        self,
        location: JwksLocation,
        store: KeySink,
        *,
        refresh_interval: float = 300.0,
        min_refresh_interval: float = 10.0,
        timeout: float = 5.0,
        importer: Callable[[Any], list[PublicJWK]] = import_jwks,
        fetch_document: Callable[[], Awaitable[Any]] | None = None,
        refresh_hint: Callable[[Any], float | None] | None = None,
        draw: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.location = location
        self.store = store
        self.importer = importer
        self.fetch_document = fetch_document
        #: Reads the publisher's refresh hint from a fetched document (SPIFFE bundles).
        self.refresh_hint = refresh_hint
        self._hint: float | None = None
        self._draw = draw  # jitter for the no-key retry, in [0, 1]
        #: Monotonic seconds, for the unknown-kid rate limit (tests move it instead of sleeping).
        self.clock = clock
        self.refresh_interval = refresh_interval
        self.min_refresh_interval = min_refresh_interval
        self.timeout = timeout
        self._last_attempt = -1e18
        self._inflight: asyncio.Task[str] | None = None
        self._jwks_uri: str | None = location.uri
        self.last_error: str | None = None
        #: Told (trigger, outcome) after each refresh a caller awaited to the end; outcome is
        #: ``changed``, ``unchanged`` or ``failed``.
        self.on_refresh: Callable[[str, str], None] | None = None

    @property
    def interval(self) -> float:
        """The periodic refresh interval: ``refresh_interval``, shortened to the last
        document's refresh hint when that is sooner, but never below ``min_refresh_interval``
        (or 1 s): a publisher cannot make us poll it in a tight loop."""
        hint = self._hint
        if hint is None:
            return self.refresh_interval
        return min(self.refresh_interval, max(hint, self.min_refresh_interval, 1.0))

    def may_refresh(self) -> bool:
        return self.clock() - self._last_attempt >= self.min_refresh_interval

    async def _load(self) -> list[PublicJWK]:
        loc = self.location
        if self.fetch_document is not None:
            doc = await asyncio.wait_for(self.fetch_document(), self.timeout)
        elif loc.file is not None:
            raw = await asyncio.to_thread(Path(loc.file).read_bytes)
            if len(raw) > MAX_DOCUMENT_BYTES:
                raise JwksUnavailable(f"{loc.file}: larger than {MAX_DOCUMENT_BYTES} bytes")
            try:
                doc = json.loads(raw)
            except ValueError:
                raise JwksUnavailable(f"{loc.file}: not JSON") from None
        else:
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                if self._jwks_uri is None:
                    url = loc.issuer.rstrip("/") + "/.well-known/openid-configuration"
                    meta = await _get_json(session, url, loc.tls)
                    # OIDC Discovery §4.3: the issuer in the document MUST equal ours.
                    if not isinstance(meta, dict) or meta.get("issuer") != loc.issuer:
                        raise JwksUnavailable(f"{url}: issuer does not match {loc.issuer}")
                    uri = meta.get("jwks_uri")
                    if not isinstance(uri, str) or not uri.startswith(("http://", "https://")):
                        raise JwksUnavailable(f"{url}: no usable jwks_uri")
                    self._jwks_uri = uri
                doc = await _get_json(session, self._jwks_uri, loc.tls)
        try:
            keys = self.importer(doc)
        except JWKError as exc:
            raise JwksUnavailable(str(exc)) from None
        if self.refresh_hint is not None:
            self._hint = self.refresh_hint(doc)
        return keys

    async def refresh(self, trigger: str = "demand") -> bool:
        """Fetch now (single-flight); True if the key set changed. Never raises. ``trigger``
        (``startup``, ``periodic``, ``unknown_kid``) is only reported to ``on_refresh``."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._refresh_once())
        outcome = await asyncio.shield(self._inflight)
        if self.on_refresh is not None:
            self.on_refresh(trigger, outcome)
        return outcome == "changed"

    async def _refresh_once(self) -> str:
        self._last_attempt = self.clock()
        try:
            keys = await self._load()
        except (TimeoutError, JwksUnavailable, OSError, aiohttp.ClientError) as exc:
            self.last_error = str(exc) or type(exc).__name__
            if self.location.discovery and self.location.uri is None:
                self._jwks_uri = None  # rediscover next time: the jwks_uri may have moved
            log.warning(
                "jwks refresh failed issuer=%s error=%s",
                self.location.issuer,
                logfmt_value(self.last_error),
            )
            return "failed"
        self.last_error = None
        changed = self.store.replace(self.location.issuer, keys)
        if changed:
            log.info(
                "jwks updated issuer=%s kids=%s",
                self.location.issuer,
                logfmt_value(",".join(sorted(k.kid or "-" for k in keys))),
            )
        return "changed" if changed else "unchanged"

    async def run_periodic(self) -> None:
        waiting = 0  # consecutive rounds without any key for this issuer
        while True:
            if self.store.has_issuer(self.location.issuer):
                waiting, delay = 0, self.interval
            else:
                # No key yet: retry soon, then back off (about 1, 2, 4 … 30 s) so an issuer that
                # is down or a missing file is not polled (and logged) every second forever;
                # jittered so sidecars started together do not retry together.
                waiting += 1
                delay = backoff.delay(
                    waiting,
                    first=NO_KEY_RETRY_FIRST,
                    cap=NO_KEY_RETRY_CAP,
                    draw=self._draw(),
                    spread=0.5,
                )
            await asyncio.sleep(delay)
            await self.refresh("periodic")
