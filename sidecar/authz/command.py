"""``sidecar authz -c authz.yaml``: the ingress ext_authz servers and the admin endpoint.

With ``authz.workers`` > 1 this process is the parent of that many worker processes (see
:mod:`sidecar.authz.workers`); each worker is this command with ``--worker``, reading its
settings from stdin.
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from sidecar.config_util import load_yaml_file, parse_admin_listen
from sidecar.errors import ConfigError
from sidecar.listen_address import ListenAddress
from sidecar.listener_check import authz_listeners, check_listeners

if TYPE_CHECKING:
    from sidecar.authz.config import AuthzConfig
    from sidecar.authz.replay import ReplayStore
    from sidecar.authz.workers import WorkerSettings

TOP_LEVEL = ("authz", "admin")


async def serve(
    cfg: AuthzConfig,
    admin: ListenAddress,
    *,
    name: str = "authz",
    replay: ReplayStore | None = None,
    until: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """One authorizer: the ext_authz servers and the admin listener, until ``until`` returns
    (default: SIGTERM or SIGINT)."""
    from sidecar.authz.service import AuthzService
    from sidecar.net_limits import FdWatch
    from sidecar.observability.admin import make_admin_app
    from sidecar.runtime import announce, start_admin_at, wait_for_stop_signal

    registry = CollectorRegistry()
    fds = FdWatch(registry)
    fds.start()
    service = AuthzService(cfg, registry, replay=replay)
    await service.start()
    # What start-up built (keys, policy, protobuf descriptors) never becomes garbage: keep it
    # out of the collector's sight so collections walk only what checks allocate.
    gc.collect()
    gc.freeze()
    runner, admin_bound = await start_admin_at(
        make_admin_app(registry, service.readiness), admin, registry
    )
    announce(
        name,
        grpc=service.grpc_address,
        engine=service.cfg.grpc_engine,
        http=service.http_address,
        admin=admin_bound,
    )
    try:
        await (until or wait_for_stop_signal)()
    finally:
        await service.stop()
        await runner.cleanup()
        await fds.stop()


async def serve_worker(settings: WorkerSettings) -> None:
    from sidecar.authz.replay_lmdb import LmdbReplayStore
    from sidecar.authz.workers import wait_for_stop_or_orphaned, worker_config

    cfg = worker_config(settings)
    replay = None
    if cfg.replay_backend == "memory":  # this host's memory: one map for all workers
        replay = LmdbReplayStore(settings.replay_dir(), cfg.replay_capacity)
    await serve(
        cfg,
        ListenAddress(path=settings.admin_socket()),
        name=f"authz worker {settings.index}",
        replay=replay,
        until=wait_for_stop_or_orphaned,
    )


def worker_argv(config_path: str, log_level: str | None) -> list[str]:
    """The command line of one worker (``--worker`` is appended by the pool): the parent's own
    log level and format included, so ``--log-level WARNING`` quiets the workers too and
    ``--log-format json`` makes their decision lines JSON."""
    from sidecar.observability.logs import active_format

    level = ["--log-level", log_level] if log_level else []
    return [
        sys.executable, "-m", "sidecar", *level, "--log-format", active_format(),
        "authz", "-c", config_path,
    ]  # fmt: skip


async def supervise(
    data: dict[str, Any],
    cfg: AuthzConfig,
    admin: ListenAddress,
    config_path: str,
    log_level: str | None = None,
) -> None:
    from sidecar.authz.workers import PoolRegistry, WorkerPool
    from sidecar.net_limits import FdWatch
    from sidecar.observability.admin import make_admin_app
    from sidecar.runtime import announce, start_admin_site, wait_for_stop_signal

    registry = PoolRegistry()
    fds = FdWatch(registry)
    fds.start()
    # The file name only shows in ps: a worker takes its settings from the parent.
    pool = WorkerPool(data, cfg, registry, worker_argv(config_path, log_level))
    runner = None
    try:
        await pool.start()
        runner, admin_port = await start_admin_site(
            make_admin_app(registry, pool.readiness, before_scrape=pool.scrape),
            admin.host,
            admin.port,
            registry,
        )
        announce(
            "authz",
            workers=pool.count,
            grpc=cfg.grpc_listen,
            engine=cfg.grpc_engine,
            http=cfg.http_listen,
            admin=admin_port,
        )
        await wait_for_stop_signal()
    finally:
        await pool.stop()
        if runner is not None:
            await runner.cleanup()
        await fds.stop()


def _run(args: argparse.Namespace) -> int:
    from sidecar.runtime import run

    if args.worker:
        from sidecar.authz.workers import settings_from_stdin

        # Ctrl-C reaches the whole process group: only the parent decides to stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        settings = settings_from_stdin()
        run(lambda: serve_worker(settings))
        return 0

    from sidecar.authz.config import parse_authz_config

    data = load_yaml_file(args.config)
    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(key, f"one of the top-level sections {list(TOP_LEVEL)}")
    cfg = parse_authz_config(data.get("authz"))
    admin = ListenAddress(*parse_admin_listen(data))
    check_listeners([*authz_listeners(cfg), ("admin.listen", admin)])
    if cfg.workers > 1:
        run(lambda: supervise(data, cfg, admin, args.config, args.log_level))
    else:
        run(lambda: serve(cfg, admin))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("authz", help="run the ingress ext_authz server (gRPC + HTTP + admin)")
    p.add_argument("-c", "--config", required=True, help="YAML file with an 'authz' section")
    # Internal: a worker started by the parent (authz.workers > 1), settings on stdin.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_run)
