"""The broker process around the decision core (``core.Broker``): the TCP listener, the
attestation and admin Unix sockets, key generation and rotation, revocation upkeep."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import stat
import time
from dataclasses import replace
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.broker.attestation_k8s import ClusterVerifier
from sidecar.broker.attestation_unix import PeerTracker, UnixAttestor, peer_uid
from sidecar.broker.audit import AuditLog
from sidecar.broker.config import BrokerConfig, KeysConfig, issuer_for_listen
from sidecar.broker.core import Broker, Clock
from sidecar.broker.entries import EntryStore
from sidecar.broker.http_app import make_admin_socket_app, make_public_app, make_unix_app
from sidecar.broker.key_state import load_ring, save_ring
from sidecar.broker.keys import KeyEvent, KeyRing, generate_private_key, make_signing_key
from sidecar.broker.metrics import BrokerMetrics
from sidecar.broker.revocation import RevocationStore
from sidecar.broker.state_file import own_directory
from sidecar.errors import ConfigError
from sidecar.listen_address import bind_tcp
from sidecar.net_limits import ADMIN_LIMITS, ConnLimits, GuardedSite, ListenerGuard, server_options

log = logging.getLogger(__name__)

#: BrokerConfig fields a reload may not change (they shape listeners, sockets, verifiers,
#: caches or files opened at start), with the configuration key an error names.
RESTART_ONLY = {
    "listen": "listen",
    "http_connections": "connections",
    "dpop": "dpop",
    "replay_capacity": "dpop.replay_capacity",
    "attestation_socket": "attestation.socket",
    "attestation_connections": "attestation.connections",
    "clusters": "clusters",
    "subject_leeway": "tokens.subject_leeway",
    "max_subject_token_bytes": "tokens.max_subject_token_bytes",
    "revocation_state_file": "revocation.state_file",
    "revocation_max_wait": "revocation.max_wait",
    "revocation_max_waiting": "revocation.max_waiting",
    "audit_path": "audit.path",
    "admin_listen": "admin.listen",
    "admin_socket": "admin.socket",
    "state_dir": "state_dir",
    "issuer_from_listen": "issuer",
    "tls": "tls",  # the listener's context is made at start
}


def _fixed_keys(keys: KeysConfig) -> tuple[object, ...]:
    s = keys.schedule
    return (s.alg, s.rotate_every, s.prepublish, keys.key_file, keys.jwks_max_age)


#: Seconds between attempts to generate the next signing key after one failed.
ROTATION_RETRY = 30.0


def prepare_unix_socket(path: str, key: str, mode: int) -> socket.socket:
    """Bind a Unix stream socket at ``path`` with ``mode``, in a directory we own.

    The directory is created (0755) if missing. It must be a real directory owned by our
    user and writable by nobody else: otherwise another user could swap the socket for their
    own and impersonate the broker. A stale socket (nobody answering) is removed; a live one
    means another broker runs there."""
    own_directory(os.path.dirname(path), key, 0o755, shown=path)
    with contextlib.suppress(FileNotFoundError):
        existing = os.lstat(path)
        if not stat.S_ISSOCK(existing.st_mode):
            raise ConfigError(key, "a path that is free or holds a stale socket", path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: its broker is gone
        else:
            raise ConfigError(key, "a socket path no running broker uses", path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
    except OSError as exc:
        sock.close()
        raise ConfigError(key, f"a bindable socket path ({exc.strerror})", path) from None
    sock.setblocking(False)
    return sock


class BrokerService:
    """Runs a Broker: HTTP on TCP, the attestation and admin sockets, background upkeep."""

    def __init__(
        self, cfg: BrokerConfig, registry: CollectorRegistry, *, clock: Clock = time.time
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.metrics = BrokerMetrics(registry)
        self.audit = AuditLog(cfg.audit_path)
        self.revocations = RevocationStore(
            cfg.revocation_state_file, jti_retention=cfg.keys.schedule.retain_for, clock=clock
        )
        self.clusters = ClusterVerifier(
            cfg.clusters, leeway=cfg.subject_leeway, max_bytes=cfg.max_subject_token_bytes
        )
        self.unix = UnixAttestor(needs_sha256=cfg.registry.needs_sha256)
        self.entries = EntryStore(cfg.registry, [c.issuer for c in cfg.clusters], cfg.state_dir)
        self.tracker = PeerTracker()
        self.registry = registry
        self.broker: Broker | None = None
        self.http_port: int | None = None
        self._http_sock: socket.socket | None = None
        self._serving = False
        self._runners: list[web.AppRunner] = []
        self._paths: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []

    @staticmethod
    def _issuer_for(cfg: BrokerConfig, port: int) -> BrokerConfig:
        """The issuer derived from the bound port when none is set; a warning when the set
        one names another port (right only behind a proxy or port mapping)."""
        if cfg.issuer_from_listen:
            return replace(cfg, issuer=issuer_for_listen(cfg.listen[0], port, cfg.scheme))
        url = urlsplit(cfg.issuer)
        named = url.port or (443 if url.scheme == "https" else 80)
        if named != port:
            log.warning(
                "issuer %s names port %d but the broker listens on port %d: clients must "
                "reach it through that port (a proxy or port mapping), or leave issuer unset "
                "to derive it from listen",
                cfg.issuer,
                named,
                port,
            )
        return cfg

    def readiness(self) -> tuple[bool, str]:
        if self.broker is None or not self._serving:
            return False, "starting"
        missing = self.clusters.missing_keys()
        kid = self.broker.ring.active.kid
        if missing:
            return True, f"ready kid={kid}; no keys yet for cluster(s): {', '.join(missing)}"
        return True, f"ready kid={kid}"

    async def start(self) -> None:
        cfg = self.cfg
        self.revocations.load()
        if cfg.state_dir is not None:
            own_directory(cfg.state_dir, "state_dir", 0o700)
        self.entries.load()
        # Sockets first: a configuration problem (directory, a broker already running) stops
        # the start before anything slow (key generation, the clusters' keys) or anything
        # listening.
        attestation_sock = None
        if cfg.attestation_socket is not None:
            attestation_sock = prepare_unix_socket(
                cfg.attestation_socket, "attestation.socket", 0o666
            )
            self._paths.append(cfg.attestation_socket)
        admin_sock = prepare_unix_socket(cfg.admin_socket, "admin.socket", 0o600)
        self._paths.append(cfg.admin_socket)
        http_sock = self._http_sock = bind_tcp(*cfg.listen, "listen")
        self.http_port = http_sock.getsockname()[1]
        cfg = self.cfg = self._issuer_for(cfg, self.http_port)
        ring = await self._key_ring()
        await self.clusters.start()
        broker = Broker(
            cfg,
            ring=ring,
            clusters=self.clusters,
            unix=self.unix,
            revocations=self.revocations,
            audit=self.audit,
            metrics=self.metrics,
            entries=self.entries,
            clock=self.clock,
        )
        self.broker = broker
        m = self.metrics
        m.watch_grants(cfg.high_privilege_audiences)
        m.gauge("sidecar_broker_published_keys", "Keys in the JWKS", lambda: len(ring.published()))
        m.gauge(
            "sidecar_broker_revoked", "Revoked subjects and jtis", lambda: len(self.revocations)
        )
        m.gauge("sidecar_broker_replay_entries", "DPoP proof jtis remembered", broker.replay.size)
        m.gauge(
            "sidecar_broker_revocation_waiting",
            "Long-poll requests for the revocation list held right now",
            lambda: self.revocations.waiting,
        )

        sites: list[tuple[web.Application, ListenerGuard, socket.socket]] = [
            (
                make_public_app(broker),
                ListenerGuard("broker_http", cfg.http_connections, self.registry),
                http_sock,
            )
        ]
        if attestation_sock is not None:
            # The uid is read before admission (the per-uid cap); the rest of the peer's
            # credentials, with a pidfd, only for an admitted connection.
            attestation = ListenerGuard(
                "broker_attestation",
                cfg.attestation_connections,
                self.registry,
                peer_uid=peer_uid,
                on_open=self.tracker.accepted,
                on_close=self.tracker.lost,
            )
            sites.append((make_unix_app(broker, self.tracker), attestation, attestation_sock))
        admin = ListenerGuard("broker_admin_socket", ADMIN_LIMITS, self.registry)
        sites.append((make_admin_socket_app(broker), admin, admin_sock))
        for app, guard, sock in sites:
            runner = self._runner(app, guard.limits)
            await runner.setup()
            # Only the public listener serves TLS (the unix sockets are local and plain).
            tls = cfg.tls.context if sock is http_sock and cfg.tls is not None else None
            await GuardedSite(runner, guard, sock, ssl_context=tls).start()
        self._serving = True
        self._tasks.append(asyncio.create_task(self._rotate(ring)))
        self._tasks.append(asyncio.create_task(self._prune_revocations()))
        # Everything allocated so far lives as long as the process: keep it out of the
        # collector's full passes, which otherwise show up as latency spikes under load.
        gc.freeze()
        log.info(
            "broker issuer=%s kid=%s alg=%s entries=%d clusters=%d",
            cfg.issuer,
            ring.active.kid,
            ring.active.alg,
            len(cfg.registry.entries),
            len(cfg.clusters),
        )

    async def reload(self, new_config: BrokerConfig) -> None:
        """Swap in a re-read configuration: the registration entries (plus those added at run
        time), ``tokens.ttl``, ``tokens.wit_ttl``, ``tokens.high_privilege_audiences`` and
        ``keys.retire_grace``. Any other change needs a restart: it is refused with a
        ConfigError naming the key, and the old configuration stays in force."""
        broker = self.broker
        if broker is None:
            raise ConfigError("config file", "a reload after the broker has started")
        old = self.cfg
        for name, key in RESTART_ONLY.items():
            if getattr(old, name) != getattr(new_config, name):
                raise ConfigError(key, "its value at start (restart the broker to change it)")
        if _fixed_keys(old.keys) != _fixed_keys(new_config.keys):
            raise ConfigError("keys", "its value at start, apart from keys.retire_grace")
        if old.issuer_from_listen:  # keep the issuer derived from the bound port
            new_config = replace(new_config, issuer=old.issuer)
        elif old.issuer != new_config.issuer:
            raise ConfigError("issuer", "its value at start (restart the broker to change it)")
        registry = self.entries.build(new_config.registry.entries, self.entries.added)
        # The key file is unchanged (checked above): keep the key loaded at start.
        new_config = replace(
            new_config, keys=replace(new_config.keys, initial_key=old.keys.initial_key)
        )
        broker.use_config(new_config, registry)
        self.cfg = new_config
        log.info(
            "broker configuration reloaded: entries=%d token_ttl=%g",
            len(registry.entries),
            new_config.token_ttl,
        )

    def _runner(self, app: web.Application, limits: ConnLimits) -> web.AppRunner:
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=2.0,
            **server_options(limits),
        )
        self._runners.append(runner)
        return runner

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.revocations.close()  # held long-polls answer now, before the listeners close
        await self.clusters.stop()
        for runner in reversed(self._runners):
            await runner.cleanup()
        for path in self._paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if self._http_sock is not None:
            self._http_sock.close()  # when start failed before serving on it
        self.audit.close()

    async def _key_ring(self) -> KeyRing:
        """The configured key, else the keys kept in ``state_dir``, else a new key (kept there
        when ``state_dir`` is set). A kept ring resumes its schedule; a changed
        ``keys.algorithm`` retires its active key for a new one."""
        cfg = self.cfg
        schedule = cfg.keys.schedule
        keep = cfg.state_dir if cfg.keys.initial_key is None else None
        ring = None
        if keep is not None:
            ring = await asyncio.to_thread(load_ring, keep, schedule)
        now = self.clock()
        if ring is None:
            private = cfg.keys.initial_key
            if private is None:
                private = await asyncio.to_thread(generate_private_key, schedule.alg)
            ring = KeyRing(schedule, make_signing_key(private, schedule.alg, now), now)
            self._key_events([KeyEvent("key_activated", ring.active.kid, schedule.alg)], now)
        else:
            log.info("signing keys restored from %s kid=%s", keep, ring.active.kid)
            if ring.active.alg != schedule.alg:
                private = await asyncio.to_thread(generate_private_key, schedule.alg)
                key = make_signing_key(private, schedule.alg, now)
                self._key_events(ring.retire_active(key, now), now)
            self._key_events(ring.advance(now), now)
        if keep is not None:
            try:
                await asyncio.to_thread(save_ring, keep, ring)
            except OSError as exc:
                problem = f"a writable directory ({exc.strerror})"
                raise ConfigError("state_dir", problem, keep) from None
        return ring

    async def _keep_ring(self, ring: KeyRing) -> None:
        """Save the ring after a change; a failure is logged (the keys in memory still serve,
        a restart would lose them)."""
        if self.cfg.state_dir is None or self.cfg.keys.initial_key is not None:
            return
        try:
            await asyncio.to_thread(save_ring, self.cfg.state_dir, ring)
        except OSError as exc:
            log.error("cannot save signing keys to %s: %s", self.cfg.state_dir, exc.strerror)

    def _key_events(self, events: list[KeyEvent], now: float) -> None:
        for ev in events:
            self.metrics.key_events.labels(ev.event.removeprefix("key_")).inc()
            self.audit.emit(ev.event, now, result="ok", kid=ev.kid, alg=ev.alg)
            log.info("%s kid=%s alg=%s", ev.event.replace("_", " "), ev.kid, ev.alg)

    async def _rotate(self, ring: KeyRing) -> None:
        """Generate, publish, activate and retire keys on the schedule (see keys.py)."""
        while True:
            now = self.clock()
            if ring.next_key_due(now):
                try:
                    private = await asyncio.to_thread(generate_private_key, ring.schedule.alg)
                except Exception as exc:
                    # Keep serving with the active key and try again shortly; the alert on
                    # this outcome pages before the active key is retired.
                    self.metrics.key_rotations.labels("failed").inc()
                    log.error("signing key generation failed: %s", type(exc).__name__)
                    await asyncio.sleep(ROTATION_RETRY)
                    continue
                self.metrics.key_rotations.labels("ok").inc()
                now = self.clock()
                key = make_signing_key(private, ring.schedule.alg, now)
                self._key_events([ring.publish_next(key, now)], now)
                await self._keep_ring(ring)
            now = self.clock()
            events = ring.advance(now)
            self._key_events(events, now)
            if events:
                await self._keep_ring(ring)
            await asyncio.sleep(min(max(ring.next_wakeup(self.clock()), 0.05), 60.0))

    async def _prune_revocations(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, max(1.0, self.revocations.jti_retention / 10)))
            if self.revocations.prune(self.clock()):
                try:
                    await self.revocations.save()
                except OSError as exc:  # pragma: no cover - disk trouble: keep serving
                    log.error("cannot save revocations: %s", exc)
