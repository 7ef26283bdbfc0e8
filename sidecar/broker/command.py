"""``sidecar broker -c broker.yaml``: run the issuer/STS.
``sidecar broker revoke -c broker.yaml --sub S | --jti J [--restore]``: change the revocation
list of the running broker, through its admin socket (``admin.socket``; mode 0600, and the
broker also checks the caller's uid: only the broker's own user or root).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
from typing import Any

from prometheus_client import CollectorRegistry

from sidecar.config_util import load_yaml_file
from sidecar.listener_check import broker_listeners, check_listeners


async def serve(data: dict[str, Any]) -> None:
    from sidecar.broker.config import parse_broker_config
    from sidecar.broker.service import BrokerService
    from sidecar.net_limits import FdWatch
    from sidecar.observability.admin import make_admin_app
    from sidecar.runtime import announce, start_admin_site, wait_for_stop_signal

    cfg = parse_broker_config(data)
    check_listeners(broker_listeners(cfg))
    registry = CollectorRegistry()
    fds = FdWatch(registry)
    service = BrokerService(cfg, registry)
    admin_runner = None
    try:
        fds.start()
        await service.start()
        admin_port = None
        if cfg.admin_listen is not None:
            admin_runner, admin_port = await start_admin_site(
                make_admin_app(registry, service.readiness), *cfg.admin_listen, registry
            )
        announce(
            "broker",
            http=service.http_port,
            admin=admin_port,
            socket=cfg.attestation_socket,
            admin_socket=cfg.admin_socket,
        )
        await wait_for_stop_signal()
    finally:
        await service.stop()
        if admin_runner is not None:
            await admin_runner.cleanup()
        await fds.stop()


def _run(args: argparse.Namespace) -> int:
    from sidecar.runtime import run

    if args.config is None:
        print("sidecar broker: -c/--config is required", file=sys.stderr)
        return 2
    data = load_yaml_file(args.config)
    run(lambda: serve(data))
    return 0


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def admin_request(
    path: str, method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 5.0
) -> tuple[int, Any]:
    """One request to the admin socket: (status, parsed JSON body or text)."""
    conn = _UnixHTTPConnection(path, timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, url, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode(errors="replace").strip()


def _revoke(args: argparse.Namespace) -> int:
    from sidecar.broker.config import parse_broker_config

    cfg = parse_broker_config(load_yaml_file(args.config))
    kind, value = ("sub", args.sub) if args.sub is not None else ("jti", args.jti)
    body = {kind: value, "action": "restore" if args.restore else "revoke"}
    try:
        status, doc = admin_request(cfg.admin_socket, "POST", "/admin/revoke", body)
    except OSError as exc:
        print(
            f"sidecar broker revoke: cannot reach the broker at {cfg.admin_socket}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    if status != 200:
        print(f"sidecar broker revoke: HTTP {status}: {doc}", file=sys.stderr)
        return 1
    print(json.dumps(doc, sort_keys=True))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "broker",
        help="run the embedded issuer/STS (OIDC discovery, JWKS, token exchange, attestation)",
    )
    p.add_argument("-c", "--config", default=None, help="broker YAML (see examples/broker.yaml)")
    p.set_defaults(func=_run)
    actions = p.add_subparsers(dest="broker_command", required=False, metavar="{revoke}")
    r = actions.add_parser(
        "revoke", help="revoke (or --restore) a subject or a token id on the running broker"
    )
    # SUPPRESS: the sub-parser must not overwrite a -c given before "revoke".
    r.add_argument("-c", "--config", default=argparse.SUPPRESS, help="the broker's YAML")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--sub", help="a subject (SPIFFE ID): all its tokens are refused")
    which.add_argument("--jti", help="one token id")
    r.add_argument("--restore", action="store_true", help="undo an earlier revocation")
    r.set_defaults(func=_revoke_checked)


def _revoke_checked(args: argparse.Namespace) -> int:
    if getattr(args, "config", None) is None:
        print("sidecar broker revoke: -c/--config is required", file=sys.stderr)
        return 2
    return _revoke(args)
