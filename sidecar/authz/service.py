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

from sidecar.authz.config import AuthzConfig, IssuerSource
from sidecar.authz.core import Authorizer, AuthzSettings
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
from sidecar.authz.trust_domains import TrustBundles, TrustDomainSource, make_bundle_source
from sidecar.config_reload import needs_restart
from sidecar.errors import ReplayStoreUnavailable
from sidecar.identity.workload_api import WorkloadApi
from sidecar.jose.jwks import KeyStore
from sidecar.jwks_source import JwksSource
from sidecar.listen_address import ListenAddress, unlink_socket
from sidecar.net_limits import ListenerGuard, server_options
from sidecar.observability.metrics import AuthzMetrics
from sidecar.runtime import start_listener_site

if TYPE_CHECKING:
    from sidecar.authz.replay_redis import RedisReplayStore

log = logging.getLogger(__name__)

#: What a reload cannot change in place (the listeners, the engine serving them, the stores
#: and feeds opened at start): field of AuthzConfig → its configuration key.
RESTART_ONLY = {
    "grpc_listen": "authz.grpc.listen",
    "grpc_engine": "authz.grpc.engine",
    "grpc_workers": "authz.grpc.workers",
    "grpc_connections": "authz.grpc.connections",
    "http_listen": "authz.http.listen",
    "http_path_prefix": "authz.http.path_prefix",
    "http_connections": "authz.http.connections",
    "default_scheme": "authz.default_scheme",
    "replay_backend": "authz.replay.backend",
    "replay_capacity": "authz.replay.capacity",
    "redis_url": "authz.replay.redis_url",
    "revocation_url": "authz.revocation.url",
    "revocation_interval": "authz.revocation.interval",
    "revocation_wait": "authz.revocation.wait",
    "revocation_tls": "authz.revocation.tls",
    "workers": "authz.workers",
}


def refuse_restart_only_changes(running: AuthzConfig, new: AuthzConfig) -> None:
    """ConfigError naming every setting that differs and needs a restart."""
    keys = [k for f, k in RESTART_ONLY.items() if getattr(running, f) != getattr(new, f)]
    if keys:
        raise needs_restart(", ".join(keys))


def _token_rules(s: AuthzSettings) -> tuple[Any, ...]:
    """What a cached verified token was verified under."""
    return (
        s.issuers,
        s.audiences,
        s.trust_domains,
        s.leeway,
        s.max_token_bytes,
        s.token_cache_size,
    )


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
        # Trust domains' bundles, refreshed like issuers' keys; a token with an unknown key
        # names its source as spiffe://<trust domain> (trust_domains.refresh_target).
        self.bundles = TrustBundles()
        self.sources: dict[str, JwksSource] = {}
        self.bundle_sources: dict[str, JwksSource] = {}
        self._specs: dict[JwksSource, IssuerSource | TrustDomainSource] = {}
        self._workload_apis: dict[JwksSource, WorkloadApi] = {}
        self._periodic: dict[JwksSource, asyncio.Task[None]] = {}
        self.sources, self.bundle_sources, _ = self._key_sources(cfg)
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
        self.clock = clock
        self.authorizer = self._authorizer(cfg, self.nonces, None)
        self._guards: list[CheckGuard] = []
        self.metrics = AuthzMetrics(registry)
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

    def _key_sources(
        self, cfg: AuthzConfig
    ) -> tuple[dict[str, JwksSource], dict[str, JwksSource], list[JwksSource]]:
        """The key sources ``cfg`` names (issuer → source, trust domain → source): the running
        one where its settings did not change, a new one (also listed third) where they did."""
        running = {spec: source for source, spec in self._specs.items()}
        added: list[JwksSource] = []

        def reuse_or(spec: IssuerSource | TrustDomainSource) -> JwksSource:
            source = running.get(spec)
            if source is not None:
                return source
            if isinstance(spec, IssuerSource):
                source = JwksSource(
                    spec.location,
                    self.keys,
                    refresh_interval=spec.refresh_interval,
                    min_refresh_interval=spec.min_refresh_interval,
                )
            else:
                source, api = make_bundle_source(spec, self.bundles)
                if api is not None:
                    self._workload_apis[source] = api
            source.on_refresh = self._jwks_refreshed
            self._specs[source] = spec
            added.append(source)
            return source

        issuers = {s.location.issuer: reuse_or(s) for s in cfg.sources}
        domains = {td.name: reuse_or(td) for td in cfg.trust_domains}
        return issuers, domains, added

    def _jwks_refreshed(self, trigger: str, outcome: str) -> None:
        self.metrics.jwks_refreshed(trigger, outcome)

    async def reload(self, new: AuthzConfig) -> None:
        """Swap in ``new`` without dropping a listener or a check in flight: the policy,
        audiences, authorities, issuers and trust domains (their key sources too), token and
        proof settings, nonces. A change only a restart can make (a listener, the engine,
        the replay store, the revocation feed, the connection limits) raises ConfigError and
        leaves everything as it was."""
        refuse_restart_only_changes(self.cfg, new)
        sources, bundle_sources, added = self._key_sources(new)
        try:
            # New key sources load (bounded, as at start) before anything trusts them.
            await self._first_load(added)
            nonces = self.nonces
            if (new.nonce_secret, new.nonce_window, new.settings.audiences) != (
                self.cfg.nonce_secret,
                self.cfg.nonce_window,
                self.cfg.settings.audiences,
            ):
                context = ",".join(sorted(new.settings.audiences))
                nonces = NonceService(new.nonce_secret, window=new.nonce_window, context=context)
            authorizer = self._authorizer(new, nonces, self.authorizer)
        except BaseException:
            await self._drop_sources(added)
            raise
        old = self._all_sources()
        # The swap: assignments only, no await in between, so a check sees all of the old
        # configuration or all of the new (a check in flight finishes with the one it began).
        self.cfg, self.nonces, self.authorizer = new, nonces, authorizer
        self.sources, self.bundle_sources = sources, bundle_sources
        for guard in self._guards:
            guard.authorizer = authorizer
        kept = set(self._all_sources())
        await self._drop_sources([s for s in old if s not in kept])
        for source in added:
            if source.last_error is not None:  # a new location that did not answer: its
                source.store.forget(source.location.issuer)  # old keys are not trusted
            self._periodic[source] = asyncio.create_task(source.run_periodic())
        log.info(
            "authz configuration reloaded: %d issuer(s), %d trust domain(s), %d rule(s)",
            len(sources),
            len(bundle_sources),
            len(new.policy.rules),
        )

    async def _first_load(self, sources: list[JwksSource]) -> None:
        """Load ``sources`` once, waiting at most 5 s: an issuer that is down does not block
        (its checks deny ``unknown_key`` until its keys arrive)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(s.refresh("startup") for s in sources)), timeout=5.0
            )

    async def _drop_sources(self, sources: list[JwksSource]) -> None:
        """Stop sources no longer configured; their keys go unless a source that replaced
        them holds the same issuer or trust domain."""
        live = {s.location.issuer for s in self._all_sources()}
        for source in sources:
            task = self._periodic.pop(source, None)
            if task is not None:
                task.cancel()
            api = self._workload_apis.pop(source, None)
            if api is not None:
                await api.close()
            self._specs.pop(source, None)
            if source.location.issuer not in live:
                source.store.forget(source.location.issuer)

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
        await self._first_load(self._all_sources())
        for source in self._all_sources():
            self._periodic[source] = asyncio.create_task(source.run_periodic())
        if self.revocation_poller is not None:
            self._tasks.append(asyncio.create_task(self.revocation_poller.run()))
        if self.cfg.grpc_listen is not None:
            checks = self._guard("grpc")
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
                self._guard("http"),
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

    def _authorizer(
        self, cfg: AuthzConfig, nonces: NonceService, running: Authorizer | None
    ) -> Authorizer:
        authorizer = Authorizer(
            cfg.settings,
            keys=self.keys,
            policy=cfg.policy,
            replay=self.replay,
            nonces=nonces,
            revocations=self.revocations,
            clock=self.clock,
            on_unknown_key=self._on_unknown_key,
            bundles=self.bundles,
        )
        if running is not None:
            # What was verified under the same token rules stays verified: a policy change
            # does not make every caller's token go through the signature check again.
            old, new = running.settings, cfg.settings
            if _token_rules(old) == _token_rules(new):
                authorizer.token_cache = running.token_cache
            if old.proof_key_cache_size == new.proof_key_cache_size:
                authorizer.proof_keys = running.proof_keys
        return authorizer

    def _guard(self, transport: str) -> CheckGuard:
        guard = CheckGuard(self.authorizer, self.metrics, transport)
        self._guards.append(guard)  # a reload points it at the new authorizer
        return guard

    def _all_sources(self) -> list[JwksSource]:
        return [*self.sources.values(), *self.bundle_sources.values()]

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._periodic.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._grpc is not None:
            await stop_grpc_server(self._grpc, grace=1.0)
        if self._http is not None:
            await self._http.cleanup()
        unlink_socket(self.grpc_address)
        unlink_socket(self.http_address)
        for api in self._workload_apis.values():
            await api.close()
        close = getattr(self.replay, "close", None)
        if close is not None:
            await close()
