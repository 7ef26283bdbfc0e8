"""The ``authz`` section of a sidecar configuration file, validated into typed settings.

Every error names the offending key (``authz.issuers[0].algorithms``) and what it expects.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.authz.core import AuthzSettings
from sidecar.authz.policy import Policy, empty_policy
from sidecar.authz.replay import DEFAULT_MAX_MEMORY_MIB, capacity_for
from sidecar.authz.target import parse_authority
from sidecar.authz.trust_domains import TrustDomainSource, parse_trust_domains
from sidecar.authz.wimse import parse_wimse
from sidecar.config_source import EnvValue, keep_going, report
from sidecar.config_util import (
    JWKS_LOCATION_KEYS,
    get_algorithms,
    get_bool,
    get_choice,
    get_dpop_policy,
    get_duration,
    get_int,
    get_jwks_location,
    get_num,
    get_opt_str,
    get_opt_url,
    get_str,
    get_str_list,
    get_whole_seconds,
    known_keys,
    parse_fetch_tls,
    section,
)
from sidecar.errors import ConfigError
from sidecar.jose.rfc7515_jws import normalize_typ
from sidecar.jose.rfc9068_access_token import IssuerPolicy
from sidecar.jwks_source import JwksLocation
from sidecar.listen_address import ListenAddress, check_worker_addresses, parse_listen_address
from sidecar.listener_check import authz_listeners, check_collisions
from sidecar.net_limits import GRPC_LIMITS, HTTP_LIMITS, ConnLimits, parse_conn_limits
from sidecar.revocation_wire import MAX_WAIT
from sidecar.tls_settings import TLSClient

#: ext_authz gRPC engines (see sidecar.authz.grpc_server): our HTTP/2 server on the event loop
#: (default, measured fastest), grpcio's threaded server, grpcio's asyncio server.
GRPC_ENGINES = ("loop", "threads", "aio")

log = logging.getLogger(__name__)


#: An issuer's keys besides where its keys come from (``JWKS_LOCATION_KEYS``).
ISSUER_KEYS = {"algorithms", "token_types", "refresh_interval", "min_refresh_interval"}


@dataclass(frozen=True, slots=True)
class IssuerSource:
    location: JwksLocation
    refresh_interval: float
    min_refresh_interval: float


@dataclass(frozen=True, slots=True)
class AuthzConfig:
    settings: AuthzSettings
    policy: Policy
    sources: tuple[IssuerSource, ...]
    grpc_listen: ListenAddress | None
    grpc_engine: str
    grpc_workers: int
    http_listen: ListenAddress | None
    http_path_prefix: str
    default_scheme: str
    nonce_secret: bytes
    nonce_window: float
    replay_backend: str
    replay_capacity: int
    redis_url: str | None
    unknown_kid_wait: float
    revocation_url: str | None
    revocation_interval: float
    revocation_wait: int
    revocation_tls: TLSClient | None = None
    workers: int = 1
    http_connections: ConnLimits = HTTP_LIMITS
    grpc_connections: ConnLimits = GRPC_LIMITS
    trust_domains: tuple[TrustDomainSource, ...] = ()


def _issuer(raw: Any, key: str) -> tuple[IssuerPolicy, IssuerSource]:
    item = section(raw, key)
    known_keys(item, key, JWKS_LOCATION_KEYS | ISSUER_KEYS)
    location = get_jwks_location(item, key)
    types = get_str_list(item, "token_types", key, ["at+jwt"])
    policy = IssuerPolicy(
        issuer=location.issuer,
        algorithms=get_algorithms(item, "algorithms", key, ["ES256"]),
        token_types=frozenset(normalize_typ(t) for t in types if t != "none"),
    )
    source = IssuerSource(
        location=location,
        refresh_interval=get_duration(item, "refresh_interval", key, 300.0, minimum=1.0),
        min_refresh_interval=get_duration(item, "min_refresh_interval", key, 10.0),
    )
    return policy, source


def _path_prefix(http: Mapping[str, Any], path: str) -> str:
    prefix = http.get("path_prefix", "")
    if not isinstance(prefix, str) or (
        prefix and (not prefix.startswith("/") or prefix.endswith("/"))
    ):
        report(
            ConfigError(f"{path}.path_prefix", "'' or a path like /authz (no trailing /)", prefix)
        )
        return ""
    return prefix


def _authorities(root: Mapping[str, Any], path: str) -> frozenset[str]:
    values = get_str_list(root, "authorities", path, [])
    origins = set()
    for i, value in enumerate(values):
        try:
            origins.add(parse_authority(value))
        except ValueError:
            raise ConfigError(
                f"{path}.authorities[{i}]",
                "an origin scheme://host[:port] (http or https, no path, query or fragment)",
                value,
            ) from None
    if not origins:
        log.warning(
            "%s.authorities is not set: a DPoP proof's htu is compared with the origin the "
            "client's Host header names; list the scheme://host[:port] this service answers to",
            path,
        )
    return frozenset(origins)


def _workers(grpc: Mapping[str, Any], path: str) -> int:
    workers = get_int(grpc, "workers", path, 4, minimum=1)
    if workers > 64:  # the workers take turns on one lock: more only costs memory
        report(ConfigError(f"{path}.workers", "an integer from 1 to 64", workers))
        return 64
    return workers


def _replay_capacity(replay: Mapping[str, Any], key: str) -> int:
    """``capacity`` (entries) or ``max_memory`` (MiB, converted with the measured entry size)."""
    if "capacity" in replay and "max_memory" in replay:
        report(ConfigError(key, "only one of capacity (entries) or max_memory (MiB)"))
    if "capacity" in replay:
        return get_int(replay, "capacity", key, 0, minimum=1)
    return capacity_for(get_num(replay, "max_memory", key, DEFAULT_MAX_MEMORY_MIB, minimum=1.0))


MAX_WORKERS = 256


def _process_workers(root: Mapping[str, Any], path: str) -> int:
    """``authz.workers``: an integer, or ``auto`` for the CPUs this process may run on."""
    value = root.get("workers", 1)
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    if isinstance(value, EnvValue) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        report(
            ConfigError(f"{path}.workers", f"an integer from 1 to {MAX_WORKERS}, or auto", value)
        )
        return 1
    return value


def _check_worker_listeners(
    grpc: ListenAddress | None, http: ListenAddress | None, workers: int, path: str
) -> None:
    """Each worker binds port + index (or path.index): the two ranges must not collide."""
    for address, key in ((grpc, f"{path}.grpc.listen"), (http, f"{path}.http.listen")):
        if address is not None:
            check_worker_addresses(address, workers, key)
    if workers == 1 or grpc is None or http is None:
        return
    grpc_all = {grpc.for_worker(i, workers) for i in range(workers)}
    http_all = {http.for_worker(i, workers) for i in range(workers)}
    if any(a.path is not None or a.port != 0 for a in grpc_all & http_all):
        last = grpc.for_worker(workers - 1, workers)
        raise ConfigError(
            f"{path}.http.listen",
            f"an address outside the gRPC workers' {grpc} .. {last} "
            f"({workers} workers each bind port + index, or path.index)",
            str(http),
        )


def _secret(nonce: Mapping[str, Any], key: str, required: bool) -> bytes:
    secret = get_opt_str(nonce, "secret", key)
    secret_file = get_opt_str(nonce, "secret_file", key)
    if secret is not None and secret_file is not None:
        raise ConfigError(key, "only one of secret or secret_file")
    if secret_file is not None:
        try:
            secret = Path(secret_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{key}.secret_file", f"a readable file ({exc.strerror})") from None
    if secret is None:
        if required:
            log.warning(
                "%s.secret is not set: using a random nonce secret; replicas of this "
                "service will not accept each other's nonces",
                key,
            )
        return secrets.token_bytes(32)
    if len(secret.encode()) < 16:
        raise ConfigError(f"{key}.secret", "at least 16 bytes")
    return secret.encode()


def parse_authz_config(data: Any, path: str = "authz") -> AuthzConfig:
    root = section(data, path)
    known_keys(
        root,
        path,
        {
            "audience",
            "audiences",
            "issuers",
            "grpc",
            "http",
            "default_scheme",
            "leeway",
            "dpop",
            "nonce",
            "replay",
            "limits",
            "token_cache_size",
            "routes",
            "rules",
            "unknown_kid_wait",
            "revocation",
            "workers",
            "authorities",
            "trust_domains",
            "wimse",
        },
    )
    audiences = get_str_list(root, "audiences", path, None) if "audiences" in root else None
    if audiences is None:
        audiences = [get_str(root, "audience", path)]
    trust_domains = parse_trust_domains(root, path)
    raw_issuers = root.get("issuers", [] if trust_domains else None)
    if not isinstance(raw_issuers, list) or not (raw_issuers or trust_domains):
        report(
            ConfigError(
                f"{path}.issuers",
                "a non-empty list of trusted issuers (or authz.trust_domains)",
                raw_issuers,
            )
        )
        raw_issuers = []
    policies: dict[str, IssuerPolicy] = {}
    sources = []
    for i, raw in enumerate(raw_issuers):
        with keep_going():
            policy, source = _issuer(raw, f"{path}.issuers[{i}]")
            if policy.issuer in policies:
                raise ConfigError(f"{path}.issuers[{i}].issuer", "a unique issuer", policy.issuer)
            policies[policy.issuer] = policy
            sources.append(source)

    dpop = section(root.get("dpop"), f"{path}.dpop")
    known_keys(dpop, f"{path}.dpop", {"algorithms", "max_age", "future_leeway"})
    nonce = section(root.get("nonce"), f"{path}.nonce")
    known_keys(nonce, f"{path}.nonce", {"required", "secret", "secret_file", "window"})
    nonce_default = get_bool(nonce, "required", f"{path}.nonce", False)
    policy_obj = empty_policy()
    with keep_going():
        policy_obj = Policy.from_config(root, path, nonce_default=nonce_default)
    needs_nonce = policy_obj.default_route.nonce or any(r.nonce for r in policy_obj.routes)
    limits = section(root.get("limits"), f"{path}.limits")
    known_keys(limits, f"{path}.limits", {"max_token_bytes", "max_proof_bytes"})
    replay = section(root.get("replay"), f"{path}.replay")
    known_keys(replay, f"{path}.replay", {"backend", "capacity", "max_memory", "redis_url"})
    backend = get_choice(replay, "backend", f"{path}.replay", ("memory", "redis"), "memory")
    redis_url = get_opt_str(replay, "redis_url", f"{path}.replay")
    if backend == "redis" and redis_url is None:
        report(ConfigError(f"{path}.replay.redis_url", "a redis:// URL when backend is redis"))

    settings = AuthzSettings(
        audiences=frozenset(audiences),
        issuers=policies,
        leeway=get_duration(root, "leeway", path, 5.0),
        dpop=get_dpop_policy(dpop, f"{path}.dpop", limits=limits, limits_path=f"{path}.limits"),
        max_token_bytes=get_int(limits, "max_token_bytes", f"{path}.limits", 8192, minimum=256),
        token_cache_size=get_int(root, "token_cache_size", path, 10_000),
        authorities=_authorities(root, path),
        trust_domains={td.name: td.algorithms for td in trust_domains},
        wimse=parse_wimse(root, path, get_duration(root, "leeway", path, 5.0)),
    )
    if any(r.auth == "wimse" for r in policy_obj.routes):
        if not settings.authorities:
            raise ConfigError(
                f"{path}.authorities",
                "the origins this service answers to: an auth: wimse route checks a WPT's aud "
                "against them, never against Host",
            )
        if not trust_domains:
            raise ConfigError(
                f"{path}.trust_domains",
                "at least one trust domain whose bundle has wit-svid keys (auth: wimse)",
            )
    grpc = section(root.get("grpc"), f"{path}.grpc")
    http = section(root.get("http"), f"{path}.http")
    known_keys(grpc, f"{path}.grpc", {"listen", "enabled", "engine", "workers", "connections"})
    grpc_engine = get_choice(grpc, "engine", f"{path}.grpc", GRPC_ENGINES, "loop")
    if "connections" in grpc and grpc_engine != "loop":
        # grpcio's servers (threads, aio) are not ours to guard: refuse a limit we cannot keep.
        raise ConfigError(
            f"{path}.grpc.connections", "only with engine 'loop' (the default)", grpc_engine
        )
    known_keys(http, f"{path}.http", {"listen", "enabled", "path_prefix", "connections"})
    grpc_listen = http_listen = None
    with keep_going():
        if get_bool(grpc, "enabled", f"{path}.grpc", True):
            grpc_listen = parse_listen_address(
                grpc.get("listen", "127.0.0.1:9191"), f"{path}.grpc.listen"
            )
    with keep_going():
        if get_bool(http, "enabled", f"{path}.http", True):
            http_listen = parse_listen_address(
                http.get("listen", "127.0.0.1:9192"), f"{path}.http.listen"
            )
    revocation = section(root.get("revocation"), f"{path}.revocation")
    known_keys(revocation, f"{path}.revocation", {"url", "interval", "wait", "tls"})
    wait = get_whole_seconds(revocation, "wait", f"{path}.revocation", 10)
    if wait > MAX_WAIT:
        report(ConfigError(f"{path}.revocation.wait", f"at most {MAX_WAIT} seconds", wait))
    workers = _process_workers(root, path)
    _check_worker_listeners(grpc_listen, http_listen, workers, path)
    cfg = AuthzConfig(
        settings=settings,
        policy=policy_obj,
        sources=tuple(sources),
        grpc_listen=grpc_listen,
        grpc_engine=grpc_engine,
        grpc_workers=_workers(grpc, f"{path}.grpc"),
        http_listen=http_listen,
        http_path_prefix=_path_prefix(http, f"{path}.http"),
        default_scheme=get_choice(root, "default_scheme", path, ("http", "https"), "http"),
        nonce_secret=_secret(nonce, f"{path}.nonce", needs_nonce),
        nonce_window=get_duration(nonce, "window", f"{path}.nonce", 30.0, minimum=1.0),
        replay_backend=backend,
        replay_capacity=_replay_capacity(replay, f"{path}.replay"),
        redis_url=redis_url,
        unknown_kid_wait=get_duration(root, "unknown_kid_wait", path, 0.1),
        revocation_url=get_opt_url(revocation, "url", f"{path}.revocation"),
        revocation_interval=get_duration(
            revocation, "interval", f"{path}.revocation", 5.0, minimum=0.5
        ),
        workers=workers,
        http_connections=parse_conn_limits(
            http.get("connections"), f"{path}.http.connections", HTTP_LIMITS
        ),
        grpc_connections=parse_conn_limits(
            grpc.get("connections"), f"{path}.grpc.connections", GRPC_LIMITS
        ),
        revocation_wait=wait,
        revocation_tls=parse_fetch_tls(revocation, f"{path}.revocation", "url" in revocation),
        trust_domains=trust_domains,
    )
    # Two settings on one address fail only at bind time otherwise: say which two now.
    check_collisions(authz_listeners(cfg, path))
    return cfg
