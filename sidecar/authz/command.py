"""``sidecar authz -c authz.yaml``: the ingress ext_authz servers and the admin endpoint.

With ``authz.workers`` > 1 this process is the parent of that many worker processes (see
:mod:`sidecar.authz.workers`); each worker is this command with ``--worker``, reading its
settings from stdin.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from sidecar.check_command import add_check_option
from sidecar.config_reload import (
    ConfigReloader,
    ReloadMetrics,
    attach,
    file_sha256,
    needs_restart,
    watch_option,
)
from sidecar.config_util import load_yaml_file, parse_admin_listen
from sidecar.errors import ConfigError
from sidecar.listen_address import ListenAddress
from sidecar.listener_check import authz_listeners, check_listeners

if TYPE_CHECKING:
    from sidecar.authz.config import AuthzConfig
    from sidecar.authz.replay import ReplayStore
    from sidecar.authz.service import AuthzService
    from sidecar.authz.workers import ParentPipe, WorkerSettings
    from sidecar.runtime import Lifecycle

TOP_LEVEL = ("authz", "admin")


def check_top_level(data: dict[str, Any]) -> None:
    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(key, f"one of the top-level sections {list(TOP_LEVEL)}")


def reloaded_authz(section: Any, running: AuthzConfig) -> AuthzConfig:
    """A re-read ``authz`` section → the new configuration; ConfigError when it is invalid or
    changes what only a restart can. An unconfigured nonce secret stays the running one: a
    random secret per reload would void the nonces handed out."""
    from sidecar.authz.config import parse_authz_config
    from sidecar.authz.service import refuse_restart_only_changes
    from sidecar.authz.workers import nonce_secret_configured

    new = parse_authz_config(section)
    refuse_restart_only_changes(running, new)
    if not nonce_secret_configured({"authz": section}):
        new = replace(new, nonce_secret=running.nonce_secret)
    return new


def reloaded_config(
    data: dict[str, Any], running: AuthzConfig, admin: ListenAddress
) -> AuthzConfig:
    """:func:`reloaded_authz` of a re-read ``sidecar authz`` file (the admin listener too)."""
    check_top_level(data)
    new = reloaded_authz(data.get("authz"), running)
    if ListenAddress(*parse_admin_listen(data)) != admin:
        raise needs_restart("admin.listen")
    return new


async def serve(
    cfg: AuthzConfig,
    admin: ListenAddress,
    *,
    config_path: str | None = None,
    watch: float | None = None,
) -> None:
    """One authorizer: the ext_authz servers and the admin listener, until SIGTERM or SIGINT;
    SIGHUP (or, with ``watch``, a change of the file) reloads ``config_path``."""
    from sidecar.runtime import serve as serve_lifecycle

    async def setup(lifecycle: Lifecycle) -> None:
        service, registry = await start_authorizer(lifecycle, cfg, admin, name="authz")
        if config_path is not None:

            async def apply(data: dict[str, Any], sha256: str) -> None:
                await service.reload(reloaded_config(data, service.cfg, admin))

            attach(lifecycle, ConfigReloader(config_path, registry, apply), watch)

    await serve_lifecycle(setup)


async def start_authorizer(
    lifecycle: Lifecycle,
    cfg: AuthzConfig,
    admin: ListenAddress,
    *,
    name: str,
    replay: ReplayStore | None = None,
) -> tuple[AuthzService, CollectorRegistry]:
    """Start one authorizer's parts in order (each stopped by ``lifecycle`` at the end, also
    when a later one fails to start) and announce them."""
    from sidecar.authz.service import AuthzService
    from sidecar.net_limits import FdWatch
    from sidecar.observability.admin import make_admin_app
    from sidecar.runtime import announce, as_async, freeze_startup_heap

    registry = CollectorRegistry()
    fds = FdWatch(registry)
    await lifecycle.start(as_async(fds.start), fds.stop)
    service = AuthzService(cfg, registry, replay=replay)
    await lifecycle.start(service.start, service.stop)
    freeze_startup_heap()  # collections then walk only what checks allocate
    admin_bound = await lifecycle.start_admin(
        make_admin_app(registry, service.readiness), admin, registry
    )
    announce(
        name,
        grpc=service.grpc_address,
        engine=service.cfg.grpc_engine,
        http=service.http_address,
        admin=admin_bound,
    )
    return service, registry


async def serve_worker(settings: WorkerSettings, pipe: ParentPipe) -> None:
    """A worker: an authorizer until SIGTERM or until its parent's pipe closes; a new settings
    line on that pipe is a reload (the parent validated the file and forwards it)."""
    from sidecar.authz.replay_lmdb import LmdbReplayStore
    from sidecar.authz.workers import worker_config
    from sidecar.runtime import serve as serve_lifecycle

    cfg = worker_config(settings)
    replay = None
    if cfg.replay_backend == "memory":  # this host's memory: one map for all workers
        replay = LmdbReplayStore(settings.replay_dir(), cfg.replay_capacity)

    async def setup(lifecycle: Lifecycle) -> None:
        service, registry = await start_authorizer(
            lifecycle,
            cfg,
            ListenAddress(path=settings.admin_socket()),
            name=f"authz worker {settings.index}",
            replay=replay,
        )
        metrics = ReloadMetrics(registry, settings.sha256)

        async def reload() -> None:
            new = pipe.take()
            if new is not None:
                await metrics.attempt(new.sha256, lambda: service.reload(worker_config(new)))

        lifecycle.on_reload(reload)
        pipe.on_settings = lifecycle.request_reload

    await serve_lifecycle(
        setup, stop_signals=(signal.SIGTERM,), reload_signal=False, until=pipe.closed
    )


def worker_argv(config_path: str, log_level: str | None) -> list[str]:
    """The command line of one worker (``--worker`` is appended by the pool): the parent's own
    log level and format included, so ``--log-level WARNING`` quiets the workers too and
    ``--log-format json`` makes their decision lines JSON."""
    from sidecar.observability.logs import active_format

    level = ["--log-level", log_level] if log_level else []
    return [
        sys.executable,
        "-m",
        "sidecar",
        *level,
        "--log-format",
        active_format(),
        "authz",
        "-c",
        config_path,
    ]


async def supervise(
    data: dict[str, Any],
    cfg: AuthzConfig,
    admin: ListenAddress,
    config_path: str,
    log_level: str | None = None,
    watch: float | None = None,
) -> None:
    """The parent of ``authz.workers`` workers. A reload is validated here, then forwarded to
    every worker over its settings pipe (see :mod:`sidecar.authz.workers`)."""
    from sidecar.authz.workers import PoolRegistry, WorkerPool
    from sidecar.net_limits import FdWatch
    from sidecar.observability.admin import make_admin_app
    from sidecar.runtime import announce, as_async
    from sidecar.runtime import serve as serve_lifecycle

    async def setup(lifecycle: Lifecycle) -> None:
        registry = PoolRegistry()
        fds = FdWatch(registry)
        await lifecycle.start(as_async(fds.start), fds.stop)
        # The file name only shows in ps: a worker takes its settings from the parent.
        pool = WorkerPool(
            data, cfg, registry, worker_argv(config_path, log_level), file_sha256(config_path)
        )
        await lifecycle.start(pool.start, pool.stop)
        admin_bound = await lifecycle.start_admin(
            make_admin_app(registry, pool.readiness, before_scrape=pool.scrape), admin, registry
        )
        announce(
            "authz",
            workers=pool.count,
            grpc=cfg.grpc_listen,
            engine=cfg.grpc_engine,
            http=cfg.http_listen,
            admin=admin_bound.port,
        )

        async def apply(new_data: dict[str, Any], sha256: str) -> None:
            await pool.reload(new_data, reloaded_config(new_data, pool.cfg, admin), sha256)

        attach(lifecycle, ConfigReloader(config_path, registry, apply), watch)

    await serve_lifecycle(setup)


def _run(args: argparse.Namespace) -> int:
    from sidecar.runtime import run

    if args.worker:
        from sidecar.authz.workers import ParentPipe

        # Ctrl-C and a hang-up reach the whole process group: only the parent acts on them.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        pipe = ParentPipe()
        settings = pipe.first()
        run(lambda: serve_worker(settings, pipe))
        return 0

    from sidecar.config_files import parse_authz_file

    data = load_yaml_file(args.config)
    parsed = parse_authz_file(data)  # every mistake at once, with file, line and key
    cfg, admin = parsed.authz, parsed.admin
    check_listeners([*authz_listeners(cfg), ("admin.listen", admin)])
    if cfg.workers > 1:
        run(lambda: supervise(data, cfg, admin, args.config, args.log_level, args.watch_config))
    else:
        run(lambda: serve(cfg, admin, config_path=args.config, watch=args.watch_config))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("authz", help="run the ingress ext_authz server (gRPC + HTTP + admin)")
    p.add_argument("-c", "--config", required=True, help="YAML file with an 'authz' section")
    watch_option(p)
    add_check_option(p, "authz")
    # Internal: a worker started by the parent (authz.workers > 1), settings on stdin.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_run)
