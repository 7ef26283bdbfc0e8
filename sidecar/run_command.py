"""``sidecar run -c sidecar.yaml`` and ``sidecar token --audience X -c sidecar.yaml``.

``run`` starts, in ONE uvloop process: the token source (one refresher per audience), the
egress proxy (one listener per upstream, plus the optional forward proxy), the ingress
ext_authz servers when an ``authz`` section is present, and the admin server:

* ``/healthz`` — the process is up;
* ``/readyz`` — every prefetched audience has had a token, and the authorizer has its keys;
* ``/metrics`` — Prometheus;
* ``/tokens`` — per audience: the cached token's claims (decoded, NOT verified), expiry, last
  error. Never the token itself.

``token`` prints the claims and expiry of the token for an audience: the running sidecar's
(asked on its admin port), or — if none answers, with ``--fresh``, or with ``--show-token`` — a
token fetched just now by this command with its own throw-away key. Only ``--show-token``
prints a token, and only such a fresh one: the running sidecar never hands out its tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.check_command import add_check_option
from sidecar.config_reload import ConfigReloader, attach, needs_restart, watch_option
from sidecar.config_util import (
    DEFAULT_ADMIN_LISTEN,
    load_yaml_file,
    parse_admin_listen,
)
from sidecar.errors import ConfigError
from sidecar.listen_address import ListenAddress
from sidecar.listener_check import authz_listeners, check_listeners, egress_listeners

if TYPE_CHECKING:
    from sidecar.authz.service import AuthzService
    from sidecar.runtime import Lifecycle

TOP_LEVEL = ("identity", "egress", "authz", "admin")
DEFAULT_ADMIN = DEFAULT_ADMIN_LISTEN
TOKENS_KEY = web.AppKey("token_status", object)


def _check_top_level(data: dict[str, Any]) -> None:
    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(key, f"one of the top-level sections {list(TOP_LEVEL)}")


async def serve(
    data: dict[str, Any], *, config_path: str | None = None, watch: float | None = None
) -> None:
    """Every part ``data`` configures, until SIGTERM or SIGINT; SIGHUP (or, with ``watch``, a
    change of the file) reloads ``config_path``: its ``authz`` section swaps in place."""
    from sidecar.config_files import parse_run_file
    from sidecar.egress.proxy import EgressProxy
    from sidecar.identity.clock_offset import ClockOffsets
    from sidecar.identity.key import generate_signer, write_public_jwk
    from sidecar.identity.metrics import IdentityMetrics
    from sidecar.identity.source import TokenSource
    from sidecar.net_limits import FdWatch
    from sidecar.observability.admin import make_admin_app
    from sidecar.runtime import announce, as_async, freeze_startup_heap
    from sidecar.runtime import serve as serve_lifecycle

    cfg = parse_run_file(data)  # every mistake at once, with file, line and key
    egress_cfg, identity_cfg, authz_cfg = cfg.egress, cfg.identity, cfg.authz
    admin_host, admin_port = cfg.admin
    check_listeners(
        [
            *(egress_listeners(egress_cfg) if egress_cfg is not None else []),
            *(authz_listeners(authz_cfg) if authz_cfg is not None else []),
            ("admin.listen", ListenAddress(admin_host, admin_port)),
        ]
    )

    async def setup(lifecycle: Lifecycle) -> None:
        registry = CollectorRegistry()
        fds = FdWatch(registry)
        await lifecycle.start(as_async(fds.start), fds.stop)
        signer = generate_signer()  # in memory only; never written anywhere
        offsets = ClockOffsets()  # peers' clocks, learned by identity and egress alike
        tokens: TokenSource | None = None
        proxy: EgressProxy | None = None
        service: AuthzService | None = None
        if identity_cfg is not None:
            if identity_cfg.public_jwk_file:
                write_public_jwk(signer, identity_cfg.public_jwk_file)
            metrics = IdentityMetrics(registry)
            metrics.watch_clock_offsets(offsets.snapshot)
            tokens = TokenSource(
                identity_cfg.build_attestor(signer, offsets=offsets),
                identity_cfg.policy,
                list(identity_cfg.audiences),
                metrics=metrics,
            )
            await lifecycle.start(tokens.start, tokens.close)
        if egress_cfg is not None and tokens is not None:
            proxy = EgressProxy(
                egress_cfg,
                tokens=tokens,
                signer=signer,
                registry=registry,
                offsets=offsets,
                wpt_signer=signer.wpt_signer(),
            )
            await lifecycle.start(proxy.start, proxy.stop)
        if authz_cfg is not None:
            from sidecar.authz.service import AuthzService

            service = AuthzService(authz_cfg, registry)
            await lifecycle.start(service.start, service.stop)

        freeze_startup_heap()  # collections then walk only what requests allocate

        def readiness() -> tuple[bool, str]:
            reasons = []
            for part in (tokens, service):
                if part is not None:
                    ok, why = part.readiness()
                    if not ok:
                        reasons.append(why)
            return (False, "; ".join(reasons)) if reasons else (True, "ready")

        app = make_admin_app(registry, readiness)
        app[TOKENS_KEY] = tokens
        app.router.add_get("/tokens", _tokens_handler)
        admin_bound = await lifecycle.start_admin(
            app, ListenAddress(admin_host, admin_port), registry
        )
        egress_ports = ",".join(str(p) for p in proxy.ports.values()) if proxy else ""
        announce(
            "sidecar",
            egress=egress_ports or None,
            forward=proxy.forward_port if proxy else None,
            grpc=service.grpc_address if service else None,
            http=service.http_address if service else None,
            admin=admin_bound,
            jkt=signer.thumbprint if tokens is not None else None,
        )
        if config_path is not None:

            async def apply(new_data: dict[str, Any], sha256: str) -> None:
                await _reload(data, new_data, service)

            attach(lifecycle, ConfigReloader(config_path, registry, apply), watch)

    await serve_lifecycle(setup)


async def _reload(data: dict[str, Any], new: dict[str, Any], service: AuthzService | None) -> None:
    """The ``authz`` section reloads in place; identity, egress and admin need a restart (the
    egress listeners and the token refreshers are per upstream and audience)."""
    from sidecar.authz.command import reloaded_authz

    _check_top_level(new)
    for key in ("identity", "egress", "admin"):
        if new.get(key) != data.get(key):
            raise needs_restart(key)
    if (new.get("authz") is None) != (service is None):
        raise needs_restart("authz")
    if service is not None:
        await service.reload(reloaded_authz(new["authz"], service.cfg))
    data["authz"] = new.get("authz")  # what runs now, for the next comparison


def _same_host(request: web.Request) -> bool:
    """Whether the connection comes from this host (or pod): a unix socket, loopback, or the
    very address it reached. Read off the socket, never from a header."""
    transport = request.transport
    if transport is None:
        return False
    peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
    if isinstance(local, str | bytes):  # a unix socket: the filesystem decides who connects
        return True
    if not isinstance(peer, tuple):
        return False
    try:
        address = ipaddress.ip_address(peer[0].split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    if address.is_loopback or (mapped is not None and mapped.is_loopback):
        return True
    return isinstance(local, tuple) and peer[0] == local[0]


async def _tokens_handler(request: web.Request) -> web.Response:
    # Claims name the workload, its audiences and its tokens' jti: for the pod's own
    # processes (``sidecar token``, an operator's exec), not for whoever scrapes /metrics.
    if not _same_host(request):
        return web.json_response(
            {"error": "tokens_local_only", "detail": "ask from the sidecar's own host or pod"},
            status=403,
        )
    tokens = request.app[TOKENS_KEY]
    status = tokens.status() if tokens is not None else []  # type: ignore[attr-defined]
    return web.json_response({"now": time.time(), "audiences": status})


def _run(args: argparse.Namespace) -> int:
    from sidecar.runtime import run

    data = load_yaml_file(args.config)
    run(lambda: serve(data, config_path=args.config, watch=args.watch_config))
    return 0


# -- sidecar token ---------------------------------------------------------------------------


def _from_running_sidecar(data: dict[str, Any], audience: str) -> dict[str, Any] | None:
    host, port = parse_admin_listen(data)
    if port == 0:
        return None
    authority = f"[{host}]" if ":" in host else host
    url = f"http://{authority}:{port}/tokens"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2.0) as resp:
            doc = json.loads(resp.read())
    except (OSError, urllib.error.URLError, ValueError):
        return None
    for entry in doc.get("audiences", []) if isinstance(doc, dict) else []:
        if isinstance(entry, dict) and entry.get("audience") == audience and "claims" in entry:
            return {**entry, "source": f"running sidecar ({url})"}
    return None


async def _fresh(data: dict[str, Any], audience: str) -> dict[str, Any]:
    from sidecar.identity.config import parse_identity_config
    from sidecar.identity.key import generate_signer

    cfg = parse_identity_config(data.get("identity"))
    signer = generate_signer()
    attestor = cfg.build_attestor(signer)
    try:
        token = await attestor.fetch(audience)
    finally:
        await attestor.close()
    return {
        "audience": audience,
        "source": f"fresh {cfg.attestor.kind} fetch by this command (throw-away DPoP key "
        f"{signer.thumbprint})",
        "token_type": token.token_type,
        "issued_at": token.issued_at,
        "expires_at": token.expires_at,
        "claims": token.claims,
        "token": token.token,
    }


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _token(args: argparse.Namespace) -> int:
    from sidecar.identity.errors import IdentityError
    from sidecar.runtime import install_uvloop

    data = load_yaml_file(args.config)
    _check_top_level(data)
    if data.get("identity") is None:
        raise ConfigError("identity", "an identity section")
    info = None
    if not (args.fresh or args.show_token):
        info = _from_running_sidecar(data, args.audience)
    if info is None:
        install_uvloop()
        try:
            info = asyncio.run(_fresh(data, args.audience))
        except IdentityError as exc:
            print(f"sidecar token: no token for {args.audience}: {exc}", file=sys.stderr)
            return 1
    token = info.pop("token", None)
    now = time.time()
    expires_at = info.get("expires_at")
    if args.json:
        if args.show_token and token is not None:
            info["token"] = token
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"audience:   {info['audience']}")
    print(f"source:     {info['source']}")
    print(f"token_type: {info.get('token_type')}")
    if isinstance(expires_at, int | float):
        left = expires_at - now
        state = f"in {left:.1f}s" if left > 0 else f"EXPIRED {-left:.1f}s ago"
        print(f"expires_at: {_when(expires_at)} ({state})")
    print("claims (decoded, not verified):")
    print(json.dumps(info.get("claims"), indent=2, sort_keys=True))
    if args.show_token and token is not None:
        print(f"token:      {token}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="run the sidecar: egress proxy, token refresher, ext_authz (optional), admin"
    )
    p.add_argument("-c", "--config", required=True, help="YAML file (see examples/sidecar.yaml)")
    watch_option(p)
    add_check_option(p, "sidecar")
    p.set_defaults(func=_run)

    t = sub.add_parser(
        "token",
        help="print the claims and expiry of the token for an audience (not the token)",
        description=(
            "Ask the running sidecar (admin /tokens) for the claims and expiry of its token for "
            "AUDIENCE; if none answers, fetch one now with a throw-away key. Claims are decoded, "
            "not verified. The token itself is printed only with --show-token, and then it is a "
            "freshly fetched one: the running sidecar never hands out its tokens."
        ),
    )
    t.add_argument("-c", "--config", required=True, help="the sidecar's YAML file")
    t.add_argument("--audience", required=True, help="the audience (e.g. a SPIFFE ID)")
    t.add_argument("--fresh", action="store_true", help="fetch a new token instead of asking")
    t.add_argument(
        "--show-token", action="store_true", help="also print the (freshly fetched) token"
    )
    t.add_argument("--json", action="store_true", help="machine-readable output")
    t.set_defaults(func=_token)
