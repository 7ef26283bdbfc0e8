"""``sidecar authz -c authz.yaml``: the ingress ext_authz servers and the admin endpoint."""

from __future__ import annotations

import argparse
import gc
from typing import Any

from prometheus_client import CollectorRegistry

from sidecar.config_util import load_yaml_file, parse_admin_listen
from sidecar.errors import ConfigError

TOP_LEVEL = ("authz", "admin")


async def serve(data: dict[str, Any]) -> None:
    from sidecar.authz.config import parse_authz_config
    from sidecar.authz.service import AuthzService
    from sidecar.net_limits import FdWatch
    from sidecar.observability.admin import make_admin_app
    from sidecar.runtime import announce, start_admin_site, wait_for_stop_signal

    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(key, f"one of the top-level sections {list(TOP_LEVEL)}")
    cfg = parse_authz_config(data.get("authz"))
    admin_host, admin_port = parse_admin_listen(data)
    registry = CollectorRegistry()
    fds = FdWatch(registry)
    fds.start()
    service = AuthzService(cfg, registry)
    await service.start()
    # What start-up built (keys, policy, protobuf descriptors) never becomes garbage: keep it
    # out of the collector's sight so collections walk only what checks allocate.
    gc.collect()
    gc.freeze()
    runner, admin_bound = await start_admin_site(
        make_admin_app(registry, service.readiness), admin_host, admin_port, registry
    )
    announce(
        "authz",
        grpc=service.grpc_address,
        engine=service.cfg.grpc_engine,
        http=service.http_address,
        admin=admin_bound,
    )
    try:
        await wait_for_stop_signal()
    finally:
        await service.stop()
        await runner.cleanup()
        await fds.stop()


def _run(args: argparse.Namespace) -> int:
    from sidecar.runtime import run

    data = load_yaml_file(args.config)
    run(lambda: serve(data))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("authz", help="run the ingress ext_authz server (gRPC + HTTP + admin)")
    p.add_argument("-c", "--config", required=True, help="YAML file with an 'authz' section")
    p.set_defaults(func=_run)
