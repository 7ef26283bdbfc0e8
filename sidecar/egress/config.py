"""The ``egress`` section: local listeners, where they forward, and with which audience.

Example::

    egress:
      upstreams:                          # one local listener per upstream
        - name: orders                    # metric label (default: the listen address)
          listen: 127.0.0.1:15001
          upstream: http://127.0.0.1:10000          # may carry a base path: http://h:p/api
          audience: spiffe://demo.local/ns/shop/sa/orders
        - name: billing                   # WIMSE: a WIT + a WPT per request (egress/wimse.py)
          listen: 127.0.0.1:15002
          upstream: http://127.0.0.1:10001
          auth: wimse                     # token (default: the audience's access token) | wimse
          wimse: {proof_header: authorization, proof_lifetime: 30, other_tokens: []}
      forward_proxy:                      # optional, for apps that honour HTTP_PROXY
        listen: 127.0.0.1:15080
        destinations:
          - match: orders.shop:80          # host[:port] of the absolute-form request target
            audience: spiffe://demo.local/ns/shop/sa/orders
            upstream: http://127.0.0.1:10000         # optional: connect here instead
      on_existing_authorization: replace  # replace | keep | reject
      x_forwarded: keep                   # keep | strip | append
      via: true
      timeouts: {connect: 5, total: 300, read: 60}   # seconds; 0 = no limit
      nonce_retry_buffer: 65536           # replay a body this small after a nonce challenge
      max_connections: 1024               # the upstream pool
      keepalive_timeout: 30
      connections: {max_connections: 1024, header_timeout: 10, idle_timeout: 60}   # the app's side

Every error names the offending key (``egress.upstreams[0].listen``) and what it expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from yarl import URL

from sidecar.config_source import keep_going, report
from sidecar.config_util import (
    get_bool,
    get_choice,
    get_duration,
    get_int,
    get_opt_str,
    get_str,
    known_keys,
    parse_listen,
    parse_tls_client,
    section,
)
from sidecar.egress.wimse import WimseUpstream, parse_upstream_auth
from sidecar.errors import ConfigError
from sidecar.identity.rfc8693_exchange import WIT_AUDIENCE
from sidecar.listener_check import check_collisions, egress_listeners
from sidecar.net_limits import EGRESS_LIMITS, ConnLimits, parse_conn_limits
from sidecar.tls_settings import TLSClient

AUTHORIZATION_MODES = ("replace", "keep", "reject")
X_FORWARDED_MODES = ("keep", "strip", "append")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Target:
    """Where requests go: ``origin`` is ``scheme://host[:port]`` (the DPoP ``htu`` prefix and
    the nonce cache key), ``base_path`` is prepended to the request's path."""

    name: str
    origin: str
    base_path: str
    audience: str
    on_existing_authorization: str
    #: ``auth: wimse``: send a WIT and a WPT instead of an access token (``audience`` is "").
    wimse: WimseUpstream | None = None
    #: Trust for an https upstream (None: the system's CAs, no client certificate).
    tls: TLSClient | None = None

    @property
    def token_key(self) -> str:
        """The token source slot this target's credential comes from."""
        return WIT_AUDIENCE if self.wimse is not None else self.audience


@dataclass(frozen=True, slots=True)
class UpstreamListener:
    listen: tuple[str, int]
    target: Target


@dataclass(frozen=True, slots=True)
class ForwardDestination:
    """A forward-proxy destination. ``target.origin`` is empty unless ``upstream`` was given:
    then the request's own scheme, host and port are used (the common case)."""

    host: str
    port: int
    target: Target


@dataclass(frozen=True, slots=True)
class ForwardProxyConfig:
    listen: tuple[str, int]
    destinations: dict[tuple[str, int], ForwardDestination]


@dataclass(frozen=True, slots=True)
class EgressTimeouts:
    connect: float | None
    total: float | None
    read: float | None


@dataclass(frozen=True, slots=True)
class EgressConfig:
    upstreams: tuple[UpstreamListener, ...]
    forward_proxy: ForwardProxyConfig | None
    on_existing_authorization: str
    x_forwarded: str
    via: bool
    timeouts: EgressTimeouts
    nonce_retry_buffer: int
    max_connections: int
    keepalive_timeout: float
    #: The listeners' side: connections from the app.
    connections: ConnLimits = EGRESS_LIMITS

    def targets(self) -> list[tuple[str, Target]]:
        """(config key, target) of every upstream and forward-proxy destination."""
        out = [(f"egress.upstreams[{i}]", u.target) for i, u in enumerate(self.upstreams)]
        if self.forward_proxy is not None:
            out += [
                (f"egress.forward_proxy.destinations[{i}]", d.target)
                for i, d in enumerate(self.forward_proxy.destinations.values())
            ]
        return out

    @property
    def audiences(self) -> list[str]:
        """The token source slots to prefetch: the access tokens' audiences, and the WIT's
        when an upstream has ``auth: wimse``."""
        return list(dict.fromkeys(t.token_key for _, t in self.targets()))

    @property
    def wimse_keys(self) -> list[str]:
        """Config keys of the ``auth: wimse`` upstreams and destinations."""
        return [key for key, t in self.targets() if t.wimse is not None]


def parse_origin(value: str, key: str) -> tuple[str, str]:
    """``http(s)://host[:port][/base]`` → (origin, base path without trailing slash)."""
    try:
        url = URL(value)
    except (ValueError, TypeError):
        raise ConfigError(key, "an http(s) URL", value) from None
    if url.scheme not in _DEFAULT_PORTS or not url.host:
        raise ConfigError(key, "an http(s) URL with a host", value)
    if url.user or url.password or url.query_string or url.fragment:
        raise ConfigError(key, "an http(s) URL without userinfo, query or fragment", value)
    host = url.raw_host or url.host
    if ":" in host:
        host = f"[{host}]"
    port = url.port
    authority = host if port is None or url.is_default_port() else f"{host}:{port}"
    return f"{url.scheme}://{authority}", url.raw_path.rstrip("/")


def _tls(item: Mapping[str, Any], key: str, origin: str) -> TLSClient | None:
    if item.get("tls") is not None and origin.startswith("http://"):
        raise ConfigError(f"{key}.tls", "no tls block for an http:// upstream (use https://)")
    return parse_tls_client(item.get("tls"), f"{key}.tls")


def _target(
    item: Mapping[str, Any], key: str, name: str, default_auth: str, *, upstream: bool = True
) -> Target:
    """A target from an upstream or a forward-proxy destination; ``upstream`` False: a
    destination without ``upstream``, reached at the request's own URL (origin "")."""
    origin, base = "", ""
    if upstream:
        origin, base = parse_origin(get_str(item, "upstream", key), f"{key}.upstream")
    wimse = parse_upstream_auth(item, key)
    return Target(
        name=name,
        origin=origin,
        base_path=base,
        audience="" if wimse is not None else get_str(item, "audience", key),
        on_existing_authorization=get_choice(
            item, "on_existing_authorization", key, AUTHORIZATION_MODES, default_auth
        ),
        wimse=wimse,
        # Without an upstream: for requests whose own URL is https:// (absolute-form).
        tls=_tls(item, key, origin),
    )


def _host_port(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or "]" in port:
        host, port = value, "80"
    host = host.strip("[]").lower()
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(key, "host[:port]", value)
    return host, int(port)


def _timeout(data: Mapping[str, Any], key: str, path: str, default: float) -> float | None:
    value = get_duration(data, key, path, default)
    return None if value == 0 else value


UPSTREAM_KEYS = {
    "name",
    "listen",
    "upstream",
    "audience",
    "on_existing_authorization",
    "auth",
    "wimse",
    "tls",
}


def _upstream(raw: Any, key: str, names: set[str], default_auth: str) -> UpstreamListener:
    item = section(raw, key)
    known_keys(item, key, UPSTREAM_KEYS)
    listen_raw = get_str(item, "listen", key)
    listen = parse_listen(listen_raw, f"{key}.listen")
    name = get_opt_str(item, "name", key) or listen_raw
    if name in names:
        raise ConfigError(f"{key}.name", "a unique name", name)
    names.add(name)
    return UpstreamListener(listen, _target(item, key, name, default_auth))


def parse_egress_config(data: Any, path: str = "egress") -> EgressConfig:
    root = section(data, path)
    known_keys(
        root,
        path,
        {
            "upstreams",
            "forward_proxy",
            "on_existing_authorization",
            "x_forwarded",
            "via",
            "timeouts",
            "nonce_retry_buffer",
            "max_connections",
            "keepalive_timeout",
            "connections",
        },
    )
    default_auth = get_choice(
        root, "on_existing_authorization", path, AUTHORIZATION_MODES, "replace"
    )
    raw_upstreams = root.get("upstreams", [])
    if not isinstance(raw_upstreams, list):
        report(ConfigError(f"{path}.upstreams", "a list of upstreams", raw_upstreams))
        raw_upstreams = []
    upstreams = []
    names: set[str] = set()
    for i, raw in enumerate(raw_upstreams):
        with keep_going():
            upstreams.append(_upstream(raw, f"{path}.upstreams[{i}]", names, default_auth))
    forward = None
    if root.get("forward_proxy") is not None:
        fkey = f"{path}.forward_proxy"
        fp = section(root["forward_proxy"], fkey)
        known_keys(fp, fkey, {"listen", "destinations"})
        raw_dests = fp.get("destinations")
        if not isinstance(raw_dests, list) or not raw_dests:
            raise ConfigError(f"{fkey}.destinations", "a non-empty list", raw_dests)
        dests: dict[tuple[str, int], ForwardDestination] = {}
        for i, raw in enumerate(raw_dests):
            key = f"{fkey}.destinations[{i}]"
            item = section(raw, key)
            known_keys(
                item,
                key,
                {
                    "match",
                    "audience",
                    "upstream",
                    "name",
                    "on_existing_authorization",
                    "auth",
                    "wimse",
                    "tls",
                },
            )
            host, port = _host_port(get_str(item, "match", key), f"{key}.match")
            if (host, port) in dests:
                raise ConfigError(f"{key}.match", "a destination listed once", f"{host}:{port}")
            name = get_opt_str(item, "name", key) or f"{host}:{port}"
            if name in names:  # one metric label, one target: upstreams and destinations alike
                raise ConfigError(f"{key}.name", "a name no upstream or destination uses", name)
            names.add(name)
            target = _target(item, key, name, default_auth, upstream="upstream" in item)
            dests[(host, port)] = ForwardDestination(host=host, port=port, target=target)
        forward = ForwardProxyConfig(
            parse_listen(get_str(fp, "listen", fkey), f"{fkey}.listen"), dests
        )
    timeouts = section(root.get("timeouts"), f"{path}.timeouts")
    known_keys(timeouts, f"{path}.timeouts", {"connect", "total", "read"})
    tpath = f"{path}.timeouts"
    cfg = EgressConfig(
        upstreams=tuple(upstreams),
        forward_proxy=forward,
        on_existing_authorization=default_auth,
        x_forwarded=get_choice(root, "x_forwarded", path, X_FORWARDED_MODES, "keep"),
        via=get_bool(root, "via", path, True),
        timeouts=EgressTimeouts(
            connect=_timeout(timeouts, "connect", tpath, 5.0),
            total=_timeout(timeouts, "total", tpath, 300.0),
            read=_timeout(timeouts, "read", tpath, 60.0),
        ),
        nonce_retry_buffer=get_int(root, "nonce_retry_buffer", path, 64 * 1024),
        max_connections=get_int(root, "max_connections", path, 1024, minimum=1),
        keepalive_timeout=get_duration(root, "keepalive_timeout", path, 30.0),
        connections=parse_conn_limits(
            root.get("connections"), f"{path}.connections", EGRESS_LIMITS
        ),
    )
    # Two settings on one address fail only at bind time otherwise: say which two now.
    check_collisions(egress_listeners(cfg, path))
    return cfg
