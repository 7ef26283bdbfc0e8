"""Wires the authorizer to its key sources, stores and servers, and runs them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.authz.config import AuthzConfig
from sidecar.authz.core import Authorizer
from sidecar.authz.grpc_server import (
    AuthorizationServicer,
    Engine,
    LoopCheckHandler,
    ThreadedAuthorizationServicer,
    start_grpc_server,
    stop_grpc_server,
)
from sidecar.authz.guard import CheckGuard
from sidecar.authz.http_server import make_http_app
from sidecar.authz.nonce import NonceService
from sidecar.authz.replay import InMemoryReplayStore, ReplayStore
from sidecar.authz.revocation import RevocationList, RevocationPoller
from sidecar.authz.trust_domains import TrustBundles, make_bundle_source
from sidecar.errors import ReplayStoreUnavailable
from sidecar.identity.workload_api import WorkloadApi
from sidecar.jose.jwks import JwksSource, KeyStore
from sidecar.listen_address import ListenAddress, unlink_socket
from sidecar.net_limits import ListenerGuard, server_options
from sidecar.observability.metrics import AuthzMetrics
from sidecar.runtime import start_listener_site

if TYPE_CHECKING:
    from sidecar.authz.replay_redis import RedisReplayStore

log = logging.getLogger(__name__)


class AuthzService:
    def __init__(
        self,
        cfg: AuthzConfig,
        registry: CollectorRegistry,
        *,
        clock: Callable[[], float] = time.time,
        replay: ReplayStore | None = None,
    ) -> None:
        """``replay`` overrides the store ``cfg`` names (the workers' shared one)."""
        self.cfg = cfg
        self.registry = registry
        self.keys = KeyStore()
        self.sources = {
            s.location.issuer: JwksSource(
                s.location,
                self.keys,
                refresh_interval=s.refresh_interval,
                min_refresh_interval=s.min_refresh_interval,
            )
            for s in cfg.sources
        }
        # Trust domains' bundles, refreshed like issuers' keys; a token with an unknown key
        # names its source as spiffe://<trust domain> (trust_domains.refresh_target).
        self.bundles = TrustBundles()
        self.bundle_sources: dict[str, JwksSource] = {}
        self._workload_apis: list[WorkloadApi] = []
        for td in cfg.trust_domains:
            source, api = make_bundle_source(td, self.bundles)
            self.bundle_sources[td.name] = source
            if api is not None:
                self._workload_apis.append(api)
        self.replay: ReplayStore
        self._redis: RedisReplayStore | None = None
        if replay is not None:
            self.replay = replay
        elif cfg.replay_backend == "redis":
            from sidecar.authz.replay_redis import RedisReplayStore

            assert cfg.redis_url is not None
            self.replay = self._redis = RedisReplayStore(cfg.redis_url)
        else:
            self.replay = InMemoryReplayStore(cfg.replay_capacity, epoch=clock())
        context = ",".join(sorted(cfg.settings.audiences))
        self.nonces = NonceService(cfg.nonce_secret, window=cfg.nonce_window, context=context)
        self.revocations = RevocationList()
        self.authorizer = Authorizer(
            cfg.settings,
            keys=self.keys,
            policy=cfg.policy,
            replay=self.replay,
            nonces=self.nonces,
            revocations=self.revocations,
            clock=clock,
            on_unknown_key=self._on_unknown_key,
            bundles=self.bundles,
        )
        self.metrics = AuthzMetrics(registry)
        for source in self._all_sources():
            source.on_refresh = self.metrics.jwks_refreshed
        self.metrics.cache_gauge(
            "sidecar_authz_token_cache_entries",
            "Verified access tokens cached",
            lambda: len(self.authorizer.token_cache),
        )
        self.metrics.cache_gauge(
            "sidecar_authz_replay_entries",
            "Live entries in the in-memory replay store (-1: external store)",
            self.replay.size,
        )
        self.metrics.cache_gauge(
            "sidecar_authz_proof_key_cache_entries",
            "DPoP public keys cached",
            lambda: len(self.authorizer.proof_keys),
        )
        self.metrics.cache_gauge(
            "sidecar_jwks_keys",
            "Keys held for all issuers and trust domains",
            lambda: self.keys.key_count() + self.bundles.key_count(),
        )
        self.metrics.cache_gauge(
            "sidecar_authz_revocations", "Revoked subjects and jtis", lambda: len(self.revocations)
        )
        self.revocation_poller: RevocationPoller | None = None
        if cfg.revocation_url:
            poller = self.revocation_poller = RevocationPoller(
                cfg.revocation_url,
                self.revocations,
                interval=cfg.revocation_interval,
                wait=cfg.revocation_wait,
                clock=clock,
                on_propagated=self.metrics.revocation_propagation.observe,
                tls=cfg.revocation_tls,
            )
            self.metrics.cache_gauge(
                "sidecar_authz_revocation_silence_seconds",
                "Seconds since the revocation list's issuer last answered",
                poller.silence,
            )
        self._tasks: list[asyncio.Task[None]] = []
        self._grpc: Any = None
        self._http: web.AppRunner | None = None
        # The addresses bound (the real port when 0 was configured), for the ready line.
        self.grpc_address: ListenAddress | None = None
        self.http_address: ListenAddress | None = None

    async def _on_unknown_key(self, issuer: str | None) -> bool:
        """A token names a kid we do not hold: refetch that issuer's keys (rate-limited) and
        wait a short, bounded time so the check still fits Envoy's deadline."""
        source = self.sources.get(issuer or "")
        if source is None and issuer is not None and issuer.startswith("spiffe://"):
            source = self.bundle_sources.get(issuer[len("spiffe://") :])
        if source is None or not source.may_refresh():
            return False
        try:
            return await asyncio.wait_for(
                asyncio.shield(source.refresh("unknown_kid")), self.cfg.unknown_kid_wait
            )
        except TimeoutError:
            # The fetch goes on (shielded) but nobody awaits it to the end: count it here.
            self.metrics.jwks_refreshes.labels("unknown_kid", "timeout").inc()
            return False

    def readiness(self) -> tuple[bool, str]:
        missing = [iss for iss in self.sources if not self.keys.has_issuer(iss)]
        missing += [
            f"spiffe://{td}" for td in self.bundle_sources if not self.bundles.has_issuer(td)
        ]
        if missing:
            return False, "no keys yet for issuer(s): " + ", ".join(missing)
        wait = self.authorizer.restart_guard_until() - self.authorizer.clock()
        if 0 < wait < math.inf:
            return False, f"replay store (re)started: proofs signed now pass in {wait:.1f}s"
        return True, "ready"

    async def start(self) -> None:
        if self._redis is not None:
            try:  # so that readiness knows the replay guard from the start
                await self._redis.load_epoch(self.authorizer.clock())
            except ReplayStoreUnavailable as exc:
                log.warning("replay store: %s; requests fail closed until it answers", exc)
        # First load: wait briefly so the common case starts ready, but never block start on
        # an issuer that is down — checks for it deny (unknown_key) until its keys arrive.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(s.refresh("startup") for s in self._all_sources())),
                timeout=5.0,
            )
        for source in self._all_sources():
            self._tasks.append(asyncio.create_task(source.run_periodic()))
        if self.revocation_poller is not None:
            self._tasks.append(asyncio.create_task(self.revocation_poller.run()))
        if self.cfg.grpc_listen is not None:
            checks = CheckGuard(self.authorizer, self.metrics, "grpc")
            engine: Engine
            if self.cfg.grpc_engine == "threads":
                engine = ThreadedAuthorizationServicer(
                    checks, asyncio.get_running_loop(), self.cfg.default_scheme
                )
            elif self.cfg.grpc_engine == "aio":
                engine = AuthorizationServicer(checks, self.cfg.default_scheme)
            else:
                engine = LoopCheckHandler(checks, self.cfg.default_scheme)
            self._grpc, self.grpc_address = await start_grpc_server(
                engine,
                self.cfg.grpc_listen,
                workers=self.cfg.grpc_workers,
                limits=self.cfg.grpc_connections,
                registry=self.registry,
            )
        if self.cfg.http_listen is not None:
            app = make_http_app(
                CheckGuard(self.authorizer, self.metrics, "http"),
                path_prefix=self.cfg.http_path_prefix,
                default_scheme=self.cfg.default_scheme,
            )
            # Envoy admits up to 60 KiB of headers; parse what it forwards so an oversize
            # credential gets our precise deny reason instead of aiohttp's bare 400.
            limits = self.cfg.http_connections
            self._http = web.AppRunner(
                app,
                access_log=None,
                handle_signals=False,
                max_field_size=64 * 1024,
                max_line_size=64 * 1024,
                **server_options(limits),
            )
            await self._http.setup()
            guard = ListenerGuard("authz_http", limits, self.registry)
            self.http_address = await start_listener_site(self._http, self.cfg.http_listen, guard)

    def _all_sources(self) -> list[JwksSource]:
        return [*self.sources.values(), *self.bundle_sources.values()]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._grpc is not None:
            await stop_grpc_server(self._grpc, grace=1.0)
        if self._http is not None:
            await self._http.cleanup()
        unlink_socket(self.grpc_address)
        unlink_socket(self.http_address)
        for api in self._workload_apis:
            await api.close()
        close = getattr(self.replay, "close", None)
        if close is not None:
            await close()
