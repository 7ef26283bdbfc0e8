"""Envoy v3 bootstrap configurations for the ingress side, built from typed API classes.

Envoy fronts the legacy app and asks our ext_authz server (gRPC or HTTP) about every request.
Two more modes exist as baselines: ``none`` (no auth filter at all) and ``jwt_authn`` (Envoy's
native JWT filter, no DPoP/nonce/replay support), used by the benchmarks.

The configuration is built with the betterproto2 dataclasses of ``envoy-data-plane`` (one class
per Envoy API message), never with string templates:

* :func:`ingress_bootstrap_message` returns the typed ``envoy.config.bootstrap.v3.Bootstrap``.
  Extension configs (``typed_config``, ``typed_extension_protocol_options``) are typed messages
  packed into ``google.protobuf.Any`` with ``Any.pack`` (the type URL comes from the package's
  message pool, so it cannot be misspelt).
* :func:`ingress_bootstrap` returns the same configuration as a plain dict in proto3 JSON form
  with the ``.proto`` field names (``Message.to_dict(casing=Casing.SNAKE)``): exactly what
  ``envoy -c FILE`` expects once dumped to YAML (see :func:`dump_yaml`). Callers may edit it.

Only configuration generation uses these classes, never the request path
(docs/ARCHITECTURE.md "Hot-path rules"). Measured here: importing them takes about 0.5 s and
the first build another 0.45 s (pydantic); after that a bootstrap takes about 5 ms to build,
30 ms to turn into a dict (most of it ``to_dict``) and 3 ms to dump as YAML. The hand-written
dicts this replaced took 0.01 ms.

proto3 JSON leaves out every field equal to its default (``lb_policy: ROUND_ROBIN``,
``codec_type: AUTO``, ``false`` booleans...). The few defaults that *are* the security decision
(fail closed, no peer certificate sent to the authorizer, the JWT not forwarded to the app, no
trusted proxy hops so that ``x-forwarded-proto`` is Envoy's own) are written out anyway
(:data:`EXPLICIT_DEFAULTS`) so a reader of the YAML sees them.

Field names were checked against the Envoy 1.40 API (``envoy --mode validate``). Things that
bite (the typed classes raise a ``DeprecationWarning`` when a deprecated field is set):

* ``HttpService.authorization_request.allowed_headers`` is deprecated; the list of client
  headers sent to an HTTP authorization server is the top-level ``ExtAuthz.allowed_headers``.
  That field also filters what the *gRPC* ``CheckRequest`` carries, so it is set only in HTTP
  mode (gRPC mode must see every header, e.g. to detect a duplicated ``DPoP``).
* ``Cluster.http2_protocol_options`` is deprecated: HTTP/2 to the gRPC authorizer is asked for
  with ``typed_extension_protocol_options`` / ``HttpProtocolOptions.explicit_http_config``.
* ``SubstitutionFormatString.text_format`` is deprecated: use ``text_format_source``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal, ParamSpec

import betterproto2
import yaml

# envoy-data-plane 2.2.0 (betterproto2 compiler 0.9.0) declares each message's oneof check as a
# classmethod ``@model_validator(mode="after")``, deprecated since pydantic 2.12: importing it
# warns once per class. Harmless here, and fatal under ``-W error`` (as in the tests): silence
# exactly that warning, for these imports only.
with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore",
        message=r"Using `@model_validator` with mode='after' on a classmethod",
        category=DeprecationWarning,
    )
    from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
    from envoy_data_plane.envoy.config.bootstrap.v3 import (
        Admin,
        Bootstrap,
        BootstrapStaticResources,
    )
    from envoy_data_plane.envoy.config.cluster.v3 import (
        CircuitBreakers,
        CircuitBreakersThresholds,
        Cluster,
        ClusterCommonLbConfig,
        ClusterDiscoveryType,
        ClusterDnsLookupFamily,
        ClusterLbPolicy,
    )
    from envoy_data_plane.envoy.config.core.v3 import (
        Address,
        ApiVersion,
        BackoffStrategy,
        DataSource,
        GrpcService,
        GrpcServiceEnvoyGrpc,
        HealthCheck,
        HealthCheckTcpHealthCheck,
        Http1ProtocolOptions,
        Http2ProtocolOptions,
        HttpProtocolOptions,
        HttpProtocolOptionsHeadersWithUnderscoresAction,
        HttpUri,
        Node,
        Pipe,
        RetryPolicy,
        RetryPolicyRetryHostPredicate,
        SocketAddress,
        SubstitutionFormatString,
    )
    from envoy_data_plane.envoy.config.endpoint.v3 import (
        ClusterLoadAssignment,
        Endpoint,
        LbEndpoint,
        LocalityLbEndpoints,
    )
    from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
    from envoy_data_plane.envoy.config.overload.v3 import OverloadManager, ResourceMonitor
    from envoy_data_plane.envoy.config.route.v3 import (
        Route,
        RouteAction,
        RouteConfiguration,
        RouteMatch,
        VirtualHost,
    )
    from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
    from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import (
        AuthorizationResponse,
        ExtAuthz,
        HttpService,
    )
    from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
        JwtAuthentication,
        JwtProvider,
        JwtRequirement,
        RequirementRule,
    )
    from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
    from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
        HttpConnectionManager,
        HttpConnectionManagerCodecType,
        HttpFilter,
    )
    from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import (
        DownstreamConnectionsConfig,
    )
    from envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3 import (
        PreviousHostsPredicate,
    )
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
        HttpProtocolOptions as UpstreamHttpProtocolOptions,
    )
    from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
        HttpProtocolOptionsExplicitHttpConfig,
    )
    from envoy_data_plane.envoy.type.matcher.v3 import ListStringMatcher, StringMatcher
    from envoy_data_plane.envoy.type.v3 import HttpStatus, Percent, StatusCode
    from envoy_data_plane.google.protobuf import Any as AnyProto

from sidecar.listen_address import ListenAddress

__all__ = [
    "ACCESS_LOG_FORMAT",
    "AUTHZ_GRPC_CLUSTER",
    "AUTHZ_HTTP_CLUSTER",
    "EXPLICIT_DEFAULTS",
    "HCM_STAT_PREFIX",
    "INGRESS_MODES",
    "JWT_PROVIDER_NAME",
    "UPSTREAM_CLUSTER",
    "IngressMode",
    "bootstrap_to_dict",
    "dump_yaml",
    "ingress_bootstrap",
    "ingress_bootstrap_message",
]

IngressMode = Literal["grpc", "http", "none", "jwt_authn"]
INGRESS_MODES: tuple[IngressMode, ...] = ("grpc", "http", "none", "jwt_authn")

UPSTREAM_CLUSTER = "app"
MAX_DOWNSTREAM_CONNECTIONS = 50_000
AUTHZ_GRPC_CLUSTER = "ext_authz"
AUTHZ_HTTP_CLUSTER = "ext_authz_http"
HCM_STAT_PREFIX = "ingress_http"
JWT_PROVIDER_NAME = "issuer"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
JWT_AUTHN_FILTER = "envoy.filters.http.jwt_authn"
ROUTER_FILTER = "envoy.filters.http.router"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
STDOUT_ACCESS_LOG = "envoy.access_loggers.stdout"
DOWNSTREAM_CONNECTIONS_MONITOR = "envoy.resource_monitors.global_downstream_max_connections"
PREVIOUS_HOSTS_PREDICATE = "envoy.retry_host_predicates.previous_hosts"
MAX_AUTHZ_RETRIES = 1024  # Envoy's default max_requests per cluster

# One line per request. Never log credentials (Authorization, DPoP): only what the authorizer
# chose to put in dynamic metadata (identity, deny reason).
ACCESS_LOG_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% "
    "rx=%BYTES_RECEIVED% tx=%BYTES_SENT% dur=%DURATION%ms "
    'upstream=%UPSTREAM_HOST% req_id="%REQ(X-REQUEST-ID)%" '
    "authz=%DYNAMIC_METADATA(envoy.filters.http.ext_authz)%\n"
)

# Header matchers as (kind, value) with kind a StringMatcher field: "exact" or "prefix".
_Matchers = tuple[tuple[Literal["exact", "prefix"], str], ...]

# Client request headers an HTTP authorization server receives. Envoy always adds Host,
# :method, :path, Content-Length and Authorization; they are listed anyway to be explicit.
# ``x-workload-`` is forwarded so the authorizer can see (and strip) spoofed identity headers.
HTTP_AUTHZ_ALLOWED_HEADERS: _Matchers = (
    ("exact", "authorization"),
    ("exact", "dpop"),
    ("exact", "host"),
    ("exact", "x-forwarded-proto"),
    ("exact", "x-request-id"),
    ("prefix", "x-workload-"),
    # WIMSE (auth: wimse routes): the WIT, the -01 proof header, a Txn-Token a WPT may cover.
    ("exact", "workload-identity-token"),
    ("exact", "workload-proof-token"),
    ("exact", "txn-token"),
)
# Authorizer response headers copied onto the request to the app when it allows.
HTTP_AUTHZ_UPSTREAM_HEADERS: _Matchers = (("prefix", "x-workload-"),)
# Authorizer response headers the client sees on a deny (Envoy adds WWW-Authenticate, Location,
# Content-Length, :status and Path on its own once the list is set).
HTTP_AUTHZ_CLIENT_HEADERS: _Matchers = (
    ("exact", "www-authenticate"),
    ("exact", "dpop-nonce"),
    ("exact", "x-authz-reason"),
    ("exact", "content-type"),
)
# Authorizer response headers added to the app's response when it allows (a fresh nonce).
HTTP_AUTHZ_CLIENT_HEADERS_ON_SUCCESS: _Matchers = (("exact", "dpop-nonce"),)
# Authorizer response headers that become dynamic metadata (so the access log shows them).
HTTP_AUTHZ_METADATA_HEADERS: _Matchers = (("prefix", "x-authz-"),)

# Fields written to the dict/YAML even though they equal their proto3 default (see module doc).
EXPLICIT_DEFAULTS: dict[type[betterproto2.Message], tuple[str, ...]] = {
    ExtAuthz: ("failure_mode_allow", "include_peer_certificate"),
    HttpConnectionManager: ("xff_num_trusted_hops",),
    JwtProvider: ("forward",),
    Percent: ("value",),  # healthy_panic_threshold: 0 turns panic mode off
}


# -- small typed pieces ----------------------------------------------------------------------


def _patterns(matchers: _Matchers) -> ListStringMatcher:
    patterns = [
        StringMatcher(exact=value) if kind == "exact" else StringMatcher(prefix=value)
        for kind, value in matchers
    ]
    return ListStringMatcher(patterns=patterns)


def _duration_ms(ms: int) -> timedelta:
    """A protobuf Duration (written "0.250s" in JSON/YAML)."""
    if ms <= 0:
        raise ValueError(f"timeout must be positive, got {ms} ms")
    return timedelta(milliseconds=ms)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _address(host: str, port: int) -> Address:
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    return Address(socket_address=SocketAddress(address=host, port_value=port))


def _endpoint_address(address: ListenAddress) -> Address:
    if address.path is not None:
        return Address(pipe=Pipe(path=address.path))
    return _address(address.host, address.port)


#: Envoy's idle limit on its connections to the authorizer (HTTP and gRPC): below the
#: authorizer's own (``authz.{http,grpc}.connections.idle_timeout``, 60 s by default), so Envoy
#: closes an idle connection first and never sends a check on one the authorizer is closing.
AUTHZ_IDLE_TIMEOUT = timedelta(seconds=30)


def _protocol_options(*, http2: bool, idle_timeout: timedelta | None) -> dict[str, AnyProto]:
    # Cluster.http2_protocol_options is deprecated; the map key is the extension's name,
    # which is the full name of its config message (the type URL without its prefix).
    if not http2 and idle_timeout is None:
        return {}
    explicit = (
        HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
        if http2
        else HttpProtocolOptionsExplicitHttpConfig(http_protocol_options=Http1ProtocolOptions())
    )
    options = AnyProto.pack(
        UpstreamHttpProtocolOptions(
            explicit_http_config=explicit,
            common_http_protocol_options=(
                None if idle_timeout is None else HttpProtocolOptions(idle_timeout=idle_timeout)
            ),
        )
    )
    return {options.type_url.rpartition("/")[2]: options}


def _cluster(
    name: str,
    endpoints: list[ListenAddress],
    *,
    http2: bool = False,
    connect_timeout: timedelta = timedelta(seconds=1),
    idle_timeout: timedelta | None = None,
) -> Cluster:
    """STATIC for IP literals and unix sockets, STRICT_DNS for a host name. With more than
    one endpoint (authorizer workers) the cluster also avoids a dead one: see
    :func:`_avoid_dead_endpoints`."""
    dns = any(e.path is None and not _is_ip(e.host) for e in endpoints)
    cluster = Cluster(
        name=name,
        type=ClusterDiscoveryType.STRICT_DNS if dns else ClusterDiscoveryType.STATIC,
        connect_timeout=connect_timeout,
        lb_policy=ClusterLbPolicy.ROUND_ROBIN,
        load_assignment=ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                LocalityLbEndpoints(
                    lb_endpoints=[
                        LbEndpoint(endpoint=Endpoint(address=_endpoint_address(e)))
                        for e in endpoints
                    ]
                )
            ],
        ),
        dns_lookup_family=(
            ClusterDnsLookupFamily.V4_PREFERRED if dns else ClusterDnsLookupFamily.AUTO
        ),
        typed_extension_protocol_options=_protocol_options(http2=http2, idle_timeout=idle_timeout),
    )
    if len(endpoints) > 1:
        _avoid_dead_endpoints(cluster)
    return cluster


def _avoid_dead_endpoints(cluster: Cluster) -> None:
    """Several authorizer workers: take turns (round robin), probe every worker with a TCP
    connect twice a second (a dead one is out after one failed probe and back on the first
    probe its replacement answers), and retry checks that failed to connect or were reset
    on another worker (:func:`_authz_retry_policy`). Not least-request: a dead worker has no
    requests in flight, so least-request would prefer it, retries included. No outlier
    ejection: one slow check (a timeout) on the surviving worker would eject it. Every check
    in flight may need a retry when a worker dies: the cap on concurrent retries (default 3)
    is raised to the cap on requests."""
    cluster.circuit_breakers = CircuitBreakers(
        thresholds=[CircuitBreakersThresholds(max_retries=MAX_AUTHZ_RETRIES)]
    )
    cluster.health_checks = [
        HealthCheck(
            timeout=timedelta(seconds=1),
            interval=timedelta(milliseconds=500),
            no_traffic_interval=timedelta(milliseconds=500),
            unhealthy_threshold=1,
            healthy_threshold=1,
            tcp_health_check=HealthCheckTcpHealthCheck(),
        )
    ]
    # No panic mode: by default Envoy balances over every host, dead ones included, once
    # fewer than half are healthy. A worker is unhealthy only when a TCP connect to it fails,
    # which the kernel answers for a listening worker however busy it is: so no live worker
    # is ever left out, and a dead one is out within a probe.
    cluster.common_lb_config = ClusterCommonLbConfig(healthy_panic_threshold=Percent(value=0.0))


def _authz_retry_policy(timeout: timedelta) -> RetryPolicy:
    """Retry a check that never reached a worker or whose worker died (connect failure,
    reset), on a different worker. A deny or an error answer is never retried: a check is
    decided once. A DPoP proof whose worker died after recording it is denied as replayed on
    the retry (fail closed; the client signs a new proof).

    Envoy also uses ``retry_back_off.max_interval`` as the per-try timeout of an ext_authz
    call (envoyproxy/envoy#38847; this API has no per-try field). A short one cancels every
    check slower than it and sends it to the other worker, which has seen its proof: denied
    as replayed, and the work done twice, up to 1 + ``num_retries`` times under load, where
    checks are slow. So it is longer than the check's own ``timeout``, which always ends a
    slow check first (failing closed) and is never retried; the back-off itself stays a few
    ms (base 5 ms, doubling per retry, 80 ms at most after 5)."""
    return RetryPolicy(
        retry_on="connect-failure,refused-stream,reset",
        num_retries=5,
        retry_back_off=BackoffStrategy(
            base_interval=timedelta(milliseconds=5), max_interval=timeout + timeout
        ),
        retry_host_predicate=[
            RetryPolicyRetryHostPredicate(
                name=PREVIOUS_HOSTS_PREDICATE,
                typed_config=AnyProto.pack(PreviousHostsPredicate()),
            )
        ],
        host_selection_retry_max_attempts=5,
    )


def _ext_authz_filter(
    *,
    grpc_service: GrpcService | None = None,
    http_service: HttpService | None = None,
    allowed_headers: ListStringMatcher | None = None,
) -> HttpFilter:
    """The ext_authz filter, failing closed: an unreachable or erroring authorizer gives 503."""
    config = ExtAuthz(
        grpc_service=grpc_service,
        http_service=http_service,
        allowed_headers=allowed_headers,
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=False,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        include_peer_certificate=False,
    )
    return HttpFilter(name=EXT_AUTHZ_FILTER, typed_config=AnyProto.pack(config))


def _ext_authz_grpc_filter(timeout: timedelta, retry: RetryPolicy | None) -> HttpFilter:
    # No allowed_headers: it would also filter the gRPC CheckRequest (see module doc).
    return _ext_authz_filter(
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=AUTHZ_GRPC_CLUSTER),
            timeout=timeout,
            retry_policy=retry,
        )
    )


def _ext_authz_http_filter(
    address: ListenAddress, timeout: timedelta, retry: RetryPolicy | None
) -> HttpFilter:
    # The URI only names the cluster's first endpoint: Envoy sends to the cluster's hosts.
    uri = "http://localhost" if address.path is not None else f"http://{address}"
    return _ext_authz_filter(
        http_service=HttpService(
            server_uri=HttpUri(uri=uri, cluster=AUTHZ_HTTP_CLUSTER, timeout=timeout),
            retry_policy=retry,
            authorization_response=AuthorizationResponse(
                allowed_upstream_headers=_patterns(HTTP_AUTHZ_UPSTREAM_HEADERS),
                allowed_client_headers=_patterns(HTTP_AUTHZ_CLIENT_HEADERS),
                allowed_client_headers_on_success=_patterns(HTTP_AUTHZ_CLIENT_HEADERS_ON_SUCCESS),
                dynamic_metadata_from_headers=_patterns(HTTP_AUTHZ_METADATA_HEADERS),
            ),
        ),
        # Top-level, not http_service.authorization_request.allowed_headers (deprecated).
        allowed_headers=_patterns(HTTP_AUTHZ_ALLOWED_HEADERS),
    )


def _jwt_authn_filter(issuer: str, audiences: list[str], jwks_file: str) -> HttpFilter:
    config = JwtAuthentication(
        providers={
            JWT_PROVIDER_NAME: JwtProvider(
                issuer=issuer,
                audiences=list(audiences),
                local_jwks=DataSource(filename=jwks_file),
                forward=False,
            )
        },
        rules=[
            RequirementRule(
                match=RouteMatch(prefix="/"),
                requires=JwtRequirement(provider_name=JWT_PROVIDER_NAME),
            )
        ],
    )
    return HttpFilter(name=JWT_AUTHN_FILTER, typed_config=AnyProto.pack(config))


def _http_connection_manager(http_filters: list[HttpFilter]) -> HttpConnectionManager:
    access_log = StdoutAccessLog(
        log_format=SubstitutionFormatString(
            text_format_source=DataSource(inline_string=ACCESS_LOG_FORMAT)
        )
    )
    return HttpConnectionManager(
        stat_prefix=HCM_STAT_PREFIX,
        codec_type=HttpConnectionManagerCodecType.AUTO,
        # The client is whoever connected to us: never trust a client-sent X-Forwarded-For.
        # With no trusted hops Envoy also overwrites x-forwarded-proto from the connection's
        # TLS state; the authorizer takes the request's scheme from it (authz/forwarded.py).
        use_remote_address=True,
        xff_num_trusted_hops=0,
        normalize_path=True,
        merge_slashes=True,
        request_headers_timeout=timedelta(seconds=10),
        stream_idle_timeout=timedelta(seconds=300),
        request_timeout=timedelta(seconds=300),
        common_http_protocol_options=HttpProtocolOptions(
            idle_timeout=timedelta(seconds=300),
            # Apps behind CGI/WSGI-style gateways map "x_workload_id" and "x-workload-id" to the
            # same variable: drop underscored names so they cannot smuggle an identity header.
            headers_with_underscores_action=HttpProtocolOptionsHeadersWithUnderscoresAction.DROP_HEADER,
        ),
        access_log=[AccessLog(name=STDOUT_ACCESS_LOG, typed_config=AnyProto.pack(access_log))],
        route_config=RouteConfiguration(
            name="ingress",
            virtual_hosts=[
                VirtualHost(
                    name=UPSTREAM_CLUSTER,
                    domains=["*"],
                    routes=[
                        Route(
                            match=RouteMatch(prefix="/"),
                            route=RouteAction(
                                cluster=UPSTREAM_CLUSTER, timeout=timedelta(seconds=30)
                            ),
                        )
                    ],
                )
            ],
        ),
        http_filters=http_filters,
    )


# -- the bootstrap ---------------------------------------------------------------------------


def ingress_bootstrap_message(
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
    authz_unix: str | None = None,
    authz_workers: int = 1,
    authz_timeout_ms: int = 250,
) -> Bootstrap:
    """Envoy bootstrap: one ingress listener routing ``/`` to the ``app`` cluster.

    ``mode`` picks the auth filter placed before the router:

    * ``grpc``: ext_authz over gRPC to ``authz_host:authz_port`` (cluster ``ext_authz``).
    * ``http``: ext_authz over plain HTTP to ``http://authz_host:authz_port`` (cluster
      ``ext_authz_http``); the check request keeps the client's path (with query).
    * ``none``: no auth filter (baseline).
    * ``jwt_authn``: Envoy's native JWT filter with one provider (baseline).

    ``authz_unix`` replaces ``authz_host:authz_port`` by a unix socket (an Envoy ``pipe``).
    ``authz_workers`` > 1 lists every worker of ``sidecar authz`` (port + i, or path + ``.i``,
    as :meth:`ListenAddress.for_worker` derives them) as an endpoint of the ext_authz cluster,
    with health checks, no panic mode and retries on another worker.

    Both ext_authz modes fail closed: an unreachable or erroring authorizer yields 503.

    :func:`ingress_bootstrap` takes the same arguments and returns a fresh plain dict
    (proto3 JSON, ``.proto`` field names) that callers may edit.
    """
    if mode not in INGRESS_MODES:
        raise ValueError(f"unknown mode {mode!r}")
    timeout = _duration_ms(authz_timeout_ms)
    http_filters: list[HttpFilter] = []
    clusters = [_cluster(UPSTREAM_CLUSTER, [ListenAddress(upstream_host, upstream_port)])]

    if mode in ("grpc", "http"):
        if authz_unix is not None:
            base = ListenAddress(path=authz_unix)
        elif authz_port is None:
            raise ValueError(f"mode {mode!r} needs authz_port or authz_unix")
        else:
            base = ListenAddress(authz_host, authz_port)
        if authz_workers < 1:
            raise ValueError(f"authz_workers must be at least 1, got {authz_workers}")
        endpoints = [base.for_worker(i, authz_workers) for i in range(authz_workers)]
        retry = _authz_retry_policy(timeout) if authz_workers > 1 else None
        if mode == "grpc":
            http_filters.append(_ext_authz_grpc_filter(timeout, retry))
            clusters.append(
                _cluster(
                    AUTHZ_GRPC_CLUSTER,
                    endpoints,
                    http2=True,
                    connect_timeout=timeout,
                    idle_timeout=AUTHZ_IDLE_TIMEOUT,
                )
            )
        else:
            http_filters.append(_ext_authz_http_filter(base, timeout, retry))
            clusters.append(
                _cluster(
                    AUTHZ_HTTP_CLUSTER,
                    endpoints,
                    connect_timeout=timeout,
                    idle_timeout=AUTHZ_IDLE_TIMEOUT,
                )
            )
    elif mode == "jwt_authn":
        if not jwt_issuer or not jwt_audiences or not jwt_jwks_file:
            raise ValueError("mode 'jwt_authn' needs jwt_issuer, jwt_audiences and jwt_jwks_file")
        http_filters.append(_jwt_authn_filter(jwt_issuer, jwt_audiences, jwt_jwks_file))

    http_filters.append(HttpFilter(name=ROUTER_FILTER, typed_config=AnyProto.pack(Router())))

    listener = Listener(
        name="ingress",
        address=_address(listen_host, listen_port),
        filter_chains=[
            FilterChain(
                filters=[
                    Filter(
                        name=HCM_FILTER,
                        typed_config=AnyProto.pack(_http_connection_manager(http_filters)),
                    )
                ]
            )
        ],
    )
    return Bootstrap(
        node=Node(id=f"sidecar-ingress-{mode}", cluster="sidecar-ingress"),
        admin=Admin(address=_address("127.0.0.1", admin_port)),
        static_resources=BootstrapStaticResources(listeners=[listener], clusters=clusters),
        # Without a global connection limit Envoy warns at every start; it is also a sane cap.
        overload_manager=OverloadManager(
            resource_monitors=[
                ResourceMonitor(
                    name=DOWNSTREAM_CONNECTIONS_MONITOR,
                    typed_config=AnyProto.pack(
                        DownstreamConnectionsConfig(
                            max_active_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS
                        )
                    ),
                )
            ]
        ),
    )


# -- typed message -> plain dict -------------------------------------------------------------


def bootstrap_to_dict(bootstrap: Bootstrap) -> dict[str, Any]:
    """``bootstrap`` as proto3 JSON with ``.proto`` field names, plus :data:`EXPLICIT_DEFAULTS`.

    ``Any`` fields become ``{"@type": <type URL>, <fields of the packed message>...}``, int64
    fields JSON strings, Durations ``"1.500s"``, enums their names: the form Envoy reads.
    """
    out = bootstrap.to_dict(
        output_format=betterproto2.OutputFormat.PROTO_JSON, casing=betterproto2.Casing.SNAKE
    )
    _write_explicit_defaults(bootstrap, out)
    return out


def _write_explicit_defaults(message: betterproto2.Message, out: dict[str, Any]) -> None:
    """Walk ``message`` and its dict form together; add the pinned default-valued fields."""
    if not dataclasses.is_dataclass(message):  # every generated message is a dataclass
        return
    fields = [f.name for f in dataclasses.fields(message)]
    pinned = EXPLICIT_DEFAULTS.get(type(message), ())
    if any(name not in out for name in pinned):
        missing = {name: getattr(message, name) for name in pinned if name not in out}
        # Re-insert in declaration order so the YAML reads like the .proto.
        merged = {**out, **missing}
        head = [key for key in merged if key not in fields]  # "@type" of a packed message
        ordered = {key: merged[key] for key in [*head, *(f for f in fields if f in merged)]}
        out.clear()
        out.update(ordered)
    for name in fields:
        if name in out:
            _write_explicit_defaults_value(getattr(message, name), out[name])


def _write_explicit_defaults_value(value: object, out: Any) -> None:
    if isinstance(value, AnyProto):
        inner = value.unpack()
        if inner is not None and isinstance(out, dict):
            _write_explicit_defaults(inner, out)
    elif isinstance(value, betterproto2.Message):
        if isinstance(out, dict):
            _write_explicit_defaults(value, out)
    elif isinstance(value, list) and isinstance(out, list):
        for item, item_out in zip(value, out, strict=True):
            _write_explicit_defaults_value(item, item_out)
    elif isinstance(value, dict) and isinstance(out, dict):
        for key, item in value.items():
            if isinstance(key, str) and key in out:
                _write_explicit_defaults_value(item, out[key])


# -- YAML ------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """SafeDumper that never emits YAML anchors/aliases (shared sub-dicts are written out)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(cfg: dict[str, Any]) -> str:
    """YAML text for ``envoy -c``: key order kept, block style, no anchors."""
    text: str = yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return text


P = ParamSpec("P")


def _as_dict(build: Callable[P, Bootstrap]) -> Callable[P, dict[str, Any]]:
    def as_dict(*args: P.args, **kwargs: P.kwargs) -> dict[str, Any]:
        return bootstrap_to_dict(build(*args, **kwargs))

    as_dict.__doc__ = f"{build.__name__}(...) as a plain dict (see :func:`bootstrap_to_dict`)."
    return as_dict


#: :func:`ingress_bootstrap_message` as a plain dict, ready for YAML.
ingress_bootstrap = _as_dict(ingress_bootstrap_message)
