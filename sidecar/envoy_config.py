"""Envoy v3 bootstrap configurations for the ingress side, as plain Python dicts.

Envoy fronts the legacy app and asks our ext_authz server (gRPC or HTTP) about every request.
Two more modes exist as baselines: ``none`` (no auth filter at all) and ``jwt_authn`` (Envoy's
native JWT filter, no DPoP/nonce/replay support), used by the benchmarks.

The dicts are exactly what ``envoy -c FILE`` expects once dumped to YAML (see :func:`dump_yaml`).
A later change may build them from ``envoy-data-plane`` typed classes; the signatures here stay.

Field names were checked against the Envoy 1.40 API (``envoy --mode validate``) and the
``xds-protos`` descriptors. Things that bite:

* ``HttpService.authorization_request.allowed_headers`` is deprecated; the list of client
  headers sent to an HTTP authorization server is the top-level ``ExtAuthz.allowed_headers``.
  That field also filters what the *gRPC* ``CheckRequest`` carries, so it is set only in HTTP
  mode (gRPC mode must see every header, e.g. to detect a duplicated ``DPoP``).
* ``Cluster.http2_protocol_options`` is deprecated: HTTP/2 to the gRPC authorizer is asked for
  with ``typed_extension_protocol_options`` / ``HttpProtocolOptions.explicit_http_config``.
* ``SubstitutionFormatString.text_format`` is deprecated: use ``text_format_source``.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

import yaml

__all__ = [
    "AUTHZ_GRPC_CLUSTER",
    "AUTHZ_HTTP_CLUSTER",
    "HCM_STAT_PREFIX",
    "JWT_PROVIDER_NAME",
    "UPSTREAM_CLUSTER",
    "IngressMode",
    "dump_yaml",
    "ingress_bootstrap",
]

IngressMode = Literal["grpc", "http", "none", "jwt_authn"]

UPSTREAM_CLUSTER = "app"
MAX_DOWNSTREAM_CONNECTIONS = 50_000
AUTHZ_GRPC_CLUSTER = "ext_authz"
AUTHZ_HTTP_CLUSTER = "ext_authz_http"
HCM_STAT_PREFIX = "ingress_http"
JWT_PROVIDER_NAME = "issuer"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
JWT_AUTHN_FILTER = "envoy.filters.http.jwt_authn"

_T = "type.googleapis.com/"
_HCM_TYPE = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_EXT_AUTHZ_TYPE = _T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
_JWT_AUTHN_TYPE = _T + "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
_ROUTER_TYPE = _T + "envoy.extensions.filters.http.router.v3.Router"
_STDOUT_LOG_TYPE = _T + "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
_DOWNSTREAM_CONNECTIONS_TYPE = (
    _T + "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
)
_HTTP_PROTOCOL_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_HTTP_PROTOCOL_OPTIONS_TYPE = _T + _HTTP_PROTOCOL_OPTIONS_KEY

# One line per request. Never log credentials (Authorization, DPoP): only what the authorizer
# chose to put in dynamic metadata (identity, deny reason).
ACCESS_LOG_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% "
    "rx=%BYTES_RECEIVED% tx=%BYTES_SENT% dur=%DURATION%ms "
    'upstream=%UPSTREAM_HOST% req_id="%REQ(X-REQUEST-ID)%" '
    "authz=%DYNAMIC_METADATA(envoy.filters.http.ext_authz)%\n"
)

# Client request headers an HTTP authorization server receives. Envoy always adds Host,
# :method, :path, Content-Length and Authorization; they are listed anyway to be explicit.
# ``x-workload-`` is forwarded so the authorizer can see (and strip) spoofed identity headers.
HTTP_AUTHZ_ALLOWED_HEADERS: list[dict[str, Any]] = [
    {"exact": "authorization"},
    {"exact": "dpop"},
    {"exact": "host"},
    {"exact": "x-forwarded-proto"},
    {"exact": "x-request-id"},
    {"prefix": "x-workload-"},
]
# Authorizer response headers copied onto the request to the app when it allows.
HTTP_AUTHZ_UPSTREAM_HEADERS: list[dict[str, Any]] = [{"prefix": "x-workload-"}]
# Authorizer response headers the client sees on a deny (Envoy adds WWW-Authenticate, Location,
# Content-Length, :status and Path on its own once the list is set).
HTTP_AUTHZ_CLIENT_HEADERS: list[dict[str, Any]] = [
    {"exact": "www-authenticate"},
    {"exact": "dpop-nonce"},
    {"exact": "x-authz-reason"},
    {"exact": "content-type"},
]
# Authorizer response headers added to the app's response when it allows (a fresh nonce).
HTTP_AUTHZ_CLIENT_HEADERS_ON_SUCCESS: list[dict[str, Any]] = [{"exact": "dpop-nonce"}]
# Authorizer response headers that become dynamic metadata (so the access log shows them).
HTTP_AUTHZ_METADATA_HEADERS: list[dict[str, Any]] = [{"prefix": "x-authz-"}]


def _patterns(matchers: list[dict[str, Any]]) -> dict[str, Any]:
    """A ListStringMatcher (fresh copies: callers may mutate the returned config)."""
    return {"patterns": [dict(m) for m in matchers]}


def _duration_ms(ms: int) -> str:
    """Protobuf Duration in its JSON/YAML form ("0.250s")."""
    if ms <= 0:
        raise ValueError(f"timeout must be positive, got {ms} ms")
    return f"{ms // 1000}.{ms % 1000:03d}s"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _socket_address(host: str, port: int) -> dict[str, Any]:
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    return {"socket_address": {"address": host, "port_value": port}}


def _cluster(
    name: str,
    host: str,
    port: int,
    *,
    http2: bool = False,
    connect_timeout: str = "1s",
) -> dict[str, Any]:
    """A single-endpoint cluster: STATIC for an IP literal, STRICT_DNS for a host name."""
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": connect_timeout,
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}
            ],
        },
    }
    if not _is_ip(host):
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if http2:
        cluster["typed_extension_protocol_options"] = {
            _HTTP_PROTOCOL_OPTIONS_KEY: {
                "@type": _HTTP_PROTOCOL_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _ext_authz_grpc_filter(timeout: str) -> dict[str, Any]:
    return {
        "name": EXT_AUTHZ_FILTER,
        "typed_config": {
            "@type": _EXT_AUTHZ_TYPE,
            "grpc_service": {
                "envoy_grpc": {"cluster_name": AUTHZ_GRPC_CLUSTER},
                "timeout": timeout,
            },
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "status_on_error": {"code": "ServiceUnavailable"},
            "include_peer_certificate": False,
        },
    }


def _ext_authz_http_filter(host: str, port: int, timeout: str) -> dict[str, Any]:
    uri_host = f"[{host}]" if ":" in host else host
    return {
        "name": EXT_AUTHZ_FILTER,
        "typed_config": {
            "@type": _EXT_AUTHZ_TYPE,
            "http_service": {
                "server_uri": {
                    "uri": f"http://{uri_host}:{port}",
                    "cluster": AUTHZ_HTTP_CLUSTER,
                    "timeout": timeout,
                },
                "authorization_response": {
                    "allowed_upstream_headers": _patterns(HTTP_AUTHZ_UPSTREAM_HEADERS),
                    "allowed_client_headers": _patterns(HTTP_AUTHZ_CLIENT_HEADERS),
                    "allowed_client_headers_on_success": _patterns(
                        HTTP_AUTHZ_CLIENT_HEADERS_ON_SUCCESS
                    ),
                    "dynamic_metadata_from_headers": _patterns(HTTP_AUTHZ_METADATA_HEADERS),
                },
            },
            # Top-level, not http_service.authorization_request.allowed_headers (deprecated).
            "allowed_headers": _patterns(HTTP_AUTHZ_ALLOWED_HEADERS),
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "status_on_error": {"code": "ServiceUnavailable"},
            "include_peer_certificate": False,
        },
    }


def _jwt_authn_filter(issuer: str, audiences: list[str], jwks_file: str) -> dict[str, Any]:
    return {
        "name": JWT_AUTHN_FILTER,
        "typed_config": {
            "@type": _JWT_AUTHN_TYPE,
            "providers": {
                JWT_PROVIDER_NAME: {
                    "issuer": issuer,
                    "audiences": list(audiences),
                    "local_jwks": {"filename": jwks_file},
                    "forward": False,
                }
            },
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": JWT_PROVIDER_NAME}}],
        },
    }


def ingress_bootstrap(
    *,
    listen_port: int,
    upstream_port: int,
    admin_port: int,
    mode: IngressMode,
    authz_port: int | None = None,
    jwt_issuer: str | None = None,
    jwt_audiences: list[str] | None = None,
    jwt_jwks_file: str | None = None,
    listen_host: str = "127.0.0.1",
    upstream_host: str = "127.0.0.1",
    authz_host: str = "127.0.0.1",
    authz_timeout_ms: int = 250,
) -> dict[str, Any]:
    """Envoy bootstrap: one ingress listener routing ``/`` to the ``app`` cluster.

    ``mode`` picks the auth filter placed before the router:

    * ``grpc``: ext_authz over gRPC to ``authz_host:authz_port`` (cluster ``ext_authz``).
    * ``http``: ext_authz over plain HTTP to ``http://authz_host:authz_port`` (cluster
      ``ext_authz_http``); the check request keeps the client's path (with query).
    * ``none``: no auth filter (baseline).
    * ``jwt_authn``: Envoy's native JWT filter with one provider (baseline).

    Both ext_authz modes fail closed: an unreachable or erroring authorizer yields 503.
    """
    if mode not in ("grpc", "http", "none", "jwt_authn"):
        raise ValueError(f"unknown mode {mode!r}")
    timeout = _duration_ms(authz_timeout_ms)
    http_filters: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = [_cluster(UPSTREAM_CLUSTER, upstream_host, upstream_port)]

    if mode in ("grpc", "http"):
        if authz_port is None:
            raise ValueError(f"mode {mode!r} needs authz_port")
        if mode == "grpc":
            http_filters.append(_ext_authz_grpc_filter(timeout))
            clusters.append(
                _cluster(
                    AUTHZ_GRPC_CLUSTER, authz_host, authz_port, http2=True, connect_timeout=timeout
                )
            )
        else:
            http_filters.append(_ext_authz_http_filter(authz_host, authz_port, timeout))
            clusters.append(
                _cluster(AUTHZ_HTTP_CLUSTER, authz_host, authz_port, connect_timeout=timeout)
            )
    elif mode == "jwt_authn":
        if not jwt_issuer or not jwt_audiences or not jwt_jwks_file:
            raise ValueError("mode 'jwt_authn' needs jwt_issuer, jwt_audiences and jwt_jwks_file")
        http_filters.append(_jwt_authn_filter(jwt_issuer, jwt_audiences, jwt_jwks_file))

    http_filters.append(
        {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER_TYPE}}
    )

    hcm: dict[str, Any] = {
        "@type": _HCM_TYPE,
        "stat_prefix": HCM_STAT_PREFIX,
        "codec_type": "AUTO",
        # The client is whoever connected to us: never trust a client-sent X-Forwarded-For.
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "request_headers_timeout": "10s",
        "stream_idle_timeout": "300s",
        "request_timeout": "300s",
        "common_http_protocol_options": {
            "idle_timeout": "300s",
            # Apps behind CGI/WSGI-style gateways map "x_workload_id" and "x-workload-id" to the
            # same variable: drop underscored names so they cannot smuggle an identity header.
            "headers_with_underscores_action": "DROP_HEADER",
        },
        "access_log": [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": _STDOUT_LOG_TYPE,
                    "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}},
                },
            }
        ],
        "route_config": {
            "name": "ingress",
            "virtual_hosts": [
                {
                    "name": UPSTREAM_CLUSTER,
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": UPSTREAM_CLUSTER, "timeout": "30s"},
                        }
                    ],
                }
            ],
        },
        "http_filters": http_filters,
    }

    return {
        "node": {"id": f"sidecar-ingress-{mode}", "cluster": "sidecar-ingress"},
        "admin": {"address": _socket_address("127.0.0.1", admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": _socket_address(listen_host, listen_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
        # Without a global connection limit Envoy warns at every start; it is also a sane cap.
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _DOWNSTREAM_CONNECTIONS_TYPE,
                        "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                    },
                }
            ]
        },
    }


class _Dumper(yaml.SafeDumper):
    """SafeDumper that never emits YAML anchors/aliases (shared sub-dicts are written out)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(cfg: dict[str, Any]) -> str:
    """YAML text for ``envoy -c``: key order kept, block style, no anchors."""
    text: str = yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return text
