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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from sidecar.check_command import add_check_option
from sidecar.config_reload import ConfigReloader, attach, watch_option
from sidecar.config_util import load_yaml_file
from sidecar.listen_address import ListenAddress
from sidecar.listener_check import broker_listeners, check_listeners

if TYPE_CHECKING:
    from sidecar.runtime import Lifecycle


async def serve(
    data: dict[str, Any], *, config_path: str | None = None, watch: float | None = None
) -> None:
    """The broker until SIGTERM or SIGINT; SIGHUP (or, with ``watch``, a change of the file)
    reloads ``config_path`` through :meth:`BrokerService.reload`."""
    from sidecar.broker.config import parse_broker_config
    from sidecar.broker.service import BrokerService
    from sidecar.net_limits import FdWatch
    from sidecar.observability.admin import make_admin_app
    from sidecar.runtime import announce, as_async
    from sidecar.runtime import serve as serve_lifecycle

    cfg = parse_broker_config(data)
    check_listeners(broker_listeners(cfg))

    async def setup(lifecycle: Lifecycle) -> None:
        registry = CollectorRegistry()
        fds = FdWatch(registry)
        await lifecycle.start(as_async(fds.start), fds.stop)
        service = BrokerService(cfg, registry)
        await lifecycle.start(service.start, service.stop)
        admin_port = None
        if cfg.admin_listen is not None:
            admin_port = await lifecycle.start_admin(
                make_admin_app(registry, service.readiness),
                ListenAddress(*cfg.admin_listen),
                registry,
            )
        announce(
            "broker",
            http=service.http_port,
            admin=admin_port.port if admin_port is not None else None,
            socket=cfg.attestation_socket,
            admin_socket=cfg.admin_socket,
        )
        if config_path is not None:

            async def apply(new_data: dict[str, Any], sha256: str) -> None:
                await service.reload(parse_broker_config(new_data))

            attach(lifecycle, ConfigReloader(config_path, registry, apply), watch)

    await serve_lifecycle(setup)


def _run(args: argparse.Namespace) -> int:
    from sidecar.runtime import run

    if args.config is None:
        print("sidecar broker: -c/--config is required", file=sys.stderr)
        return 2
    data = load_yaml_file(args.config)
    run(lambda: serve(data, config_path=args.config, watch=args.watch_config))
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


def _admin(
    args: argparse.Namespace, command: str, method: str, url: str, body: dict[str, Any] | None
) -> int:
    """One admin-socket request of ``sidecar broker COMMAND``: print the JSON answer."""
    from sidecar.broker.config import parse_broker_config

    cfg = parse_broker_config(load_yaml_file(args.config))
    try:
        status, doc = admin_request(cfg.admin_socket, method, url, body)
    except OSError as exc:
        print(
            f"sidecar broker {command}: cannot reach the broker at {cfg.admin_socket}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    if status != 200:
        print(f"sidecar broker {command}: HTTP {status}: {doc}", file=sys.stderr)
        return 1
    print(json.dumps(doc, sort_keys=True))
    return 0


def _revoke(args: argparse.Namespace) -> int:
    kind, value = ("sub", args.sub) if args.sub is not None else ("jti", args.jti)
    body = {kind: value, "action": "restore" if args.restore else "revoke"}
    return _admin(args, "revoke", "POST", "/admin/revoke", body)


def _entries(args: argparse.Namespace) -> int:
    name = f"entries {args.entries_command}"
    if args.entries_command == "list":
        return _admin(args, name, "GET", "/admin/entries", None)
    if args.entries_command == "remove":
        body: dict[str, Any] = {"action": "remove", "spiffe_id": args.spiffe_id}
        return _admin(args, name, "POST", "/admin/entries", body)
    entry: dict[str, Any] = {
        "spiffe_id": args.spiffe_id,
        "selectors": args.selector,
        "audiences": args.audience,
    }
    if args.ttl is not None:
        entry["ttl"] = args.ttl
    return _admin(args, name, "POST", "/admin/entries", {"action": "add", "entry": entry})


def register(sub: Any) -> None:
    p = sub.add_parser(
        "broker",
        help="run the embedded issuer/STS (OIDC discovery, JWKS, token exchange, attestation)",
    )
    p.add_argument("-c", "--config", default=None, help="broker YAML (see examples/broker.yaml)")
    watch_option(p)
    add_check_option(p, "broker")
    p.set_defaults(func=_run)
    actions = p.add_subparsers(dest="broker_command", required=False, metavar="{revoke,entries}")
    r = actions.add_parser(
        "revoke", help="revoke (or --restore) a subject or a token id on the running broker"
    )
    # SUPPRESS: the sub-parser must not overwrite a -c given before "revoke".
    r.add_argument("-c", "--config", default=argparse.SUPPRESS, help="the broker's YAML")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--sub", help="a subject (SPIFFE ID): all its tokens are refused")
    which.add_argument("--jti", help="one token id")
    r.add_argument("--restore", action="store_true", help="undo an earlier revocation")
    r.set_defaults(func=_needs_config(_revoke, "revoke"))

    e = actions.add_parser(
        "entries",
        help="list, add or remove registration entries of the running broker (added ones are "
        "kept in its state_dir)",
    )
    kinds = e.add_subparsers(dest="entries_command", required=True, metavar="{list,add,remove}")
    listing = kinds.add_parser("list", help="every entry in force, from the file or added")
    add = kinds.add_parser("add", help="add an entry (needs state_dir on the broker)")
    add.add_argument("--spiffe-id", required=True, help="the SPIFFE ID the entry grants")
    add.add_argument(
        "--selector", action="append", required=True, help="unix:uid:N, k8s:ns:NS, ... (repeat)"
    )
    add.add_argument("--audience", action="append", required=True, help="an audience glob (repeat)")
    add.add_argument("--ttl", type=float, default=None, help="token lifetime, seconds")
    remove = kinds.add_parser("remove", help="remove the added entries of a SPIFFE ID")
    remove.add_argument("--spiffe-id", required=True, help="the SPIFFE ID to remove")
    for q in (listing, add, remove):
        q.add_argument("-c", "--config", default=argparse.SUPPRESS, help="the broker's YAML")
        q.set_defaults(func=_needs_config(_entries, "entries"))


def _needs_config(
    action: Callable[[argparse.Namespace], int], name: str
) -> Callable[[argparse.Namespace], int]:
    def checked(args: argparse.Namespace) -> int:
        if getattr(args, "config", None) is None:
            print(f"sidecar broker {name}: -c/--config is required", file=sys.stderr)
            return 2
        return action(args)

    return checked
