"""The broker's YAML configuration, validated into typed settings at start.

Every error names the offending key (``entries[2].selectors[0]``, ``keys.prepublish``) and
what it expects; see ``examples/broker.yaml`` for a complete, commented file. Environment
variables override keys as for the other commands (``SIDECAR__KEYS__ROTATE_EVERY=3600``).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sidecar.broker.keys import MAX_PUBLISHED_KEYS, SIGNING_ALGORITHMS, Schedule, load_private_key
from sidecar.broker.registry import Entry, Registry, parse_entries
from sidecar.config_source import collecting, keep_going, or_default, report
from sidecar.config_util import (
    JWKS_LOCATION_KEYS,
    check_url,
    get_algorithms,
    get_bool,
    get_choice,
    get_dpop_policy,
    get_duration,
    get_int,
    get_jwks_location,
    get_opt_str,
    get_str,
    get_str_list,
    get_whole_seconds,
    known_keys,
    parse_listen,
    parse_tls_server,
    section,
)
from sidecar.errors import ConfigError
from sidecar.jose.rfc9449_dpop import DPoPPolicy
from sidecar.jwks_source import JwksLocation
from sidecar.listener_check import broker_listeners, check_collisions
from sidecar.net_limits import ATTESTATION_LIMITS, HTTP_LIMITS, ConnLimits, parse_conn_limits
from sidecar.revocation_wire import MAX_WAIT
from sidecar.tls_settings import TLSServer

#: A listen host that names no address clients could use in the issuer URL.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "*"})
DEFAULT_LISTEN = "127.0.0.1:8443"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:15021"
DEFAULT_RUN_DIR = "/tmp/sidecar-broker"
#: Kubernetes signs service-account tokens with RS256 unless told otherwise.
DEFAULT_CLUSTER_ALGS = ["RS256", "ES256"]

TOP_KEYS = {
    "issuer",
    "listen",
    "tls",
    "connections",
    "keys",
    "tokens",
    "dpop",
    "attestation",
    "clusters",
    "entries",
    "revocation",
    "audit",
    "admin",
    "state_dir",
}


#: A cluster's keys besides where its keys come from (``JWKS_LOCATION_KEYS``).
CLUSTER_KEYS = {"audiences", "algorithms", "refresh_interval", "min_refresh_interval"}


@dataclass(frozen=True, slots=True)
class KeysConfig:
    schedule: Schedule
    key_file: str | None
    #: The loaded private key (never logged; ``repr`` of this object leaves it out).
    initial_key: Any
    jwks_max_age: int

    def __repr__(self) -> str:
        return f"KeysConfig(schedule={self.schedule!r}, key_file={self.key_file!r})"


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    location: JwksLocation
    audiences: frozenset[str]
    algorithms: frozenset[str]
    refresh_interval: float
    min_refresh_interval: float

    @property
    def issuer(self) -> str:
        return self.location.issuer


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    #: The configured issuer, or one derived from ``listen`` (see ``issuer_from_listen``).
    issuer: str
    listen: tuple[str, int]
    keys: KeysConfig
    token_ttl: float
    #: Lifetime of an issued WIT (hours: its key proves every request anyway).
    wit_ttl: float
    subject_leeway: float
    max_subject_token_bytes: int
    dpop: DPoPPolicy
    replay_capacity: int
    attestation_socket: str | None
    clusters: tuple[ClusterConfig, ...]
    registry: Registry
    revocation_state_file: str | None
    revocation_max_wait: int
    revocation_max_waiting: int
    audit_path: str | None
    admin_listen: tuple[str, int] | None
    admin_socket: str
    #: Connections to ``listen`` and to the attestation socket.
    http_connections: ConnLimits = HTTP_LIMITS
    attestation_connections: ConnLimits = ATTESTATION_LIMITS
    #: Audiences whose grants are counted by name (M5); the metric's label values are bounded
    #: by this list.
    high_privilege_audiences: frozenset[str] = frozenset()
    #: ``issuer`` was not set: it is ``listen``'s scheme, host and (bound) port.
    issuer_from_listen: bool = False
    #: Where generated signing keys (without keys.key_file) are kept across restarts.
    state_dir: str | None = None
    #: ``listen`` serves https with this (None: plain http).
    tls: TLSServer | None = None

    @property
    def base_path(self) -> str:
        """The issuer's path ('' for ``http://127.0.0.1:8443``): every endpoint lives under it."""
        return urlsplit(self.issuer).path.rstrip("/")

    @property
    def scheme(self) -> str:
        return urlsplit(self.issuer).scheme

    @property
    def max_token_ttl(self) -> float:
        return self.registry.max_ttl(self.token_ttl)


def issuer_for_listen(host: str, port: int, scheme: str = "http") -> str:
    """The issuer URL a broker listening on ``host:port`` is reached at."""
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def _cluster(raw: Any, key: str) -> ClusterConfig:
    item = section(raw, key)
    known_keys(item, key, JWKS_LOCATION_KEYS | CLUSTER_KEYS)
    location = get_jwks_location(item, key)
    audiences = get_str_list(item, "audiences", key)
    if not audiences:
        raise ConfigError(f"{key}.audiences", "at least one accepted service-account audience")
    return ClusterConfig(
        location=location,
        audiences=frozenset(audiences),
        algorithms=get_algorithms(item, "algorithms", key, DEFAULT_CLUSTER_ALGS),
        refresh_interval=get_duration(item, "refresh_interval", key, 300.0, minimum=1.0),
        min_refresh_interval=get_duration(item, "min_refresh_interval", key, 10.0),
    )


def _keys(raw: Any, max_ttl: float) -> KeysConfig:
    keys = section(raw, "keys")
    known_keys(
        keys,
        "keys",
        {"algorithm", "key_file", "rotate_every", "prepublish", "retire_grace", "jwks_max_age"},
    )
    alg = get_choice(keys, "algorithm", "keys", SIGNING_ALGORITHMS, "ES256")
    key_file = get_opt_str(keys, "key_file", "keys")
    rotate_every = get_duration(keys, "rotate_every", "keys", 86400.0)
    # Default well above the verifiers' JWKS refresh interval (the authorizer's is 300 s)
    # plus the JWKS max-age, so the next key is everywhere before it signs.
    prepublish = get_duration(keys, "prepublish", "keys", 600.0)
    grace = get_duration(keys, "retire_grace", "keys", 60.0)
    jwks_max_age = get_whole_seconds(keys, "jwks_max_age", "keys", 60)
    if rotate_every > 0:
        if prepublish <= 0:
            raise ConfigError("keys.prepublish", "a number > 0 when keys rotate", prepublish)
        if prepublish >= rotate_every:
            raise ConfigError(
                "keys.prepublish", f"less than keys.rotate_every ({rotate_every:g})", prepublish
            )
        if jwks_max_age >= prepublish:
            raise ConfigError(
                "keys.jwks_max_age",
                f"less than keys.prepublish ({prepublish:g}): a cached JWKS must not hide "
                "the next key past its activation",
                jwks_max_age,
            )
    schedule = Schedule(
        alg=alg, rotate_every=rotate_every, prepublish=prepublish, retain_for=max_ttl + grace
    )
    if schedule.published_keys_bound() > MAX_PUBLISHED_KEYS:
        raise ConfigError(
            "keys.rotate_every",
            f"a period that keeps at most {MAX_PUBLISHED_KEYS} keys published (retired keys "
            f"stay for the longest token TTL + retire_grace = {schedule.retain_for:g} s)",
            rotate_every,
        )
    initial = load_private_key(key_file, alg) if key_file is not None else None
    return KeysConfig(
        schedule=schedule, key_file=key_file, initial_key=initial, jwks_max_age=jwks_max_age
    )


def check_entry_clusters(
    entries: Iterable[Entry], clusters: Collection[str], key: str = "entries"
) -> None:
    """k8s entries need a configured cluster, and a k8s:cluster: selector must name one."""
    for entry in entries:
        for sel in entry.selectors:
            if sel.startswith("k8s:cluster:") and sel[len("k8s:cluster:") :] not in clusters:
                raise ConfigError(
                    f"{key}[{entry.index}].selectors",
                    "k8s:cluster: naming the issuer of one of the configured clusters",
                    sel,
                )
        if entry.attestor == "k8s" and not clusters:
            raise ConfigError(
                f"{key}[{entry.index}].selectors", "a configured cluster (clusters[]) for k8s:"
            )


def parse_broker_config(data: Mapping[str, Any]) -> BrokerConfig:
    """The whole file, every mistake in one ConfigErrors."""
    with collecting(data):
        return _parse(data)
    raise AssertionError("unreachable: collecting raises when _parse did")


def _parse(data: Mapping[str, Any]) -> BrokerConfig:
    root = section(data, "config file")
    for name in sorted(set(root) - TOP_KEYS, key=str):
        report(ConfigError(name, f"one of the known top-level keys {sorted(TOP_KEYS)}"))
    tls = or_default(None, lambda: parse_tls_server(root.get("tls"), "tls"))
    listen = or_default(
        parse_listen(DEFAULT_LISTEN, "listen"),
        lambda: parse_listen(root.get("listen", DEFAULT_LISTEN), "listen"),
    )
    raw_issuer = root.get("issuer")
    if raw_issuer is None:
        if listen[0] in WILDCARD_HOSTS:
            raise ConfigError(
                "issuer",
                f"the URL clients reach the broker at (listen {listen[0]} names no host)",
            )
        # A port of 0 is replaced by the bound one at start.
        raw_issuer = issuer_for_listen(*listen, "http" if tls is None else "https")
    if not isinstance(raw_issuer, str):
        report(ConfigError("issuer", "a URL string", raw_issuer))
        raw_issuer = issuer_for_listen(*listen)
    fallback = issuer_for_listen(*listen)  # stands in while collecting the other mistakes
    issuer = or_default(fallback, lambda: check_url(raw_issuer, "issuer", bare=True))
    if tls is not None and not issuer.startswith("https://"):
        # Every endpoint URL we publish (discovery's jwks_uri, token_endpoint) is the issuer's.
        report(
            ConfigError("issuer", "an https:// URL: the listener serves TLS (tls is set)", issuer)
        )

    tokens = section(root.get("tokens"), "tokens")
    known_keys(
        tokens,
        "tokens",
        {"ttl", "wit_ttl", "subject_leeway", "max_subject_token_bytes", "high_privilege_audiences"},
    )
    wit_ttl = get_duration(tokens, "wit_ttl", "tokens", 14400.0, minimum=60.0)
    if wit_ttl > 86400:
        report(ConfigError("tokens.wit_ttl", "at most 86400 seconds", wit_ttl))
    ttl = get_duration(tokens, "ttl", "tokens", 300.0, minimum=1.0)
    if ttl > 86400:
        report(
            ConfigError("tokens.ttl", "at most 86400 seconds (access tokens are short-lived)", ttl)
        )

    raw_clusters = root.get("clusters") or []
    if not isinstance(raw_clusters, list):
        report(ConfigError("clusters", "a list of Kubernetes cluster issuers", raw_clusters))
        raw_clusters = []
    clusters = []
    for i, raw in enumerate(raw_clusters):
        with keep_going():
            clusters.append(_cluster(raw, f"clusters[{i}]"))
    seen: set[str] = set()
    for i, cluster in enumerate(clusters):
        if cluster.issuer in seen:
            raise ConfigError(f"clusters[{i}].issuer", "a unique issuer", cluster.issuer)
        seen.add(cluster.issuer)

    registry = or_default(Registry([]), lambda: parse_entries(root.get("entries")))
    check_entry_clusters(registry.entries, seen)

    dpop = section(root.get("dpop"), "dpop")
    known_keys(
        dpop,
        "dpop",
        {"algorithms", "max_age", "future_leeway", "max_proof_bytes", "replay_capacity"},
    )

    attestation = section(root.get("attestation"), "attestation")
    known_keys(attestation, "attestation", {"enabled", "socket", "connections"})
    socket_path: str | None = None
    if get_bool(attestation, "enabled", "attestation", True):
        socket_path = get_str(
            attestation, "socket", "attestation", f"{DEFAULT_RUN_DIR}/attestation.sock"
        )
        if not os.path.isabs(socket_path):
            raise ConfigError("attestation.socket", "an absolute path", socket_path)

    revocation = section(root.get("revocation"), "revocation")
    known_keys(revocation, "revocation", {"state_file", "max_wait", "max_waiting"})
    max_wait = get_whole_seconds(revocation, "max_wait", "revocation", 30)
    if max_wait > MAX_WAIT:
        report(ConfigError("revocation.max_wait", f"at most {MAX_WAIT} seconds", max_wait))
    http_connections = parse_conn_limits(root.get("connections"), "connections", HTTP_LIMITS)
    # Held long-polls are open connections: they may take at most a quarter of the listener's,
    # so token requests always find room.
    most_waiting = max(1, http_connections.max_connections // 4)
    max_waiting = get_int(
        revocation, "max_waiting", "revocation", min(256, most_waiting), minimum=1
    )
    if max_waiting > most_waiting:
        raise ConfigError(
            "revocation.max_waiting",
            f"at most a quarter of connections.max_connections ({most_waiting})",
            max_waiting,
        )
    audit = section(root.get("audit"), "audit")
    known_keys(audit, "audit", {"path"})

    admin = section(root.get("admin"), "admin")
    known_keys(admin, "admin", {"listen", "enabled", "socket"})
    admin_listen = (
        parse_listen(admin.get("listen", DEFAULT_ADMIN_LISTEN), "admin.listen")
        if get_bool(admin, "enabled", "admin", True)
        else None
    )
    run_dir = os.path.dirname(socket_path) if socket_path else DEFAULT_RUN_DIR
    admin_socket = get_str(admin, "socket", "admin", f"{run_dir}/admin.sock")
    if not os.path.isabs(admin_socket):
        raise ConfigError("admin.socket", "an absolute path", admin_socket)
    if admin_socket == socket_path:
        raise ConfigError("admin.socket", "a path other than attestation.socket", admin_socket)

    cfg = BrokerConfig(
        issuer=issuer,
        listen=listen,
        # Retired keys stay published as long as anything they signed: WITs included.
        keys=_keys(root.get("keys"), max(registry.max_ttl(ttl), wit_ttl)),
        token_ttl=ttl,
        wit_ttl=wit_ttl,
        subject_leeway=get_duration(tokens, "subject_leeway", "tokens", 30.0),
        max_subject_token_bytes=get_int(
            tokens, "max_subject_token_bytes", "tokens", 16384, minimum=512
        ),
        dpop=get_dpop_policy(dpop, "dpop", limits=dpop, limits_path="dpop"),
        replay_capacity=get_int(dpop, "replay_capacity", "dpop", 300_000, minimum=1),
        attestation_socket=socket_path,
        clusters=tuple(clusters),
        registry=registry,
        revocation_state_file=get_opt_str(revocation, "state_file", "revocation"),
        revocation_max_wait=max_wait,
        revocation_max_waiting=max_waiting,
        audit_path=get_opt_str(audit, "path", "audit"),
        admin_listen=admin_listen,
        admin_socket=admin_socket,
        http_connections=http_connections,
        attestation_connections=parse_conn_limits(
            attestation.get("connections"), "attestation.connections", ATTESTATION_LIMITS
        ),
        high_privilege_audiences=frozenset(
            get_str_list(tokens, "high_privilege_audiences", "tokens", [])
        ),
        issuer_from_listen=root.get("issuer") is None,
        state_dir=_state_dir(root),
        tls=tls,
    )
    # Two settings on one address fail only at bind time otherwise: say which two now.
    check_collisions(broker_listeners(cfg))
    return cfg


def _state_dir(root: Mapping[str, Any]) -> str | None:
    value = root.get("state_dir")
    if value is not None and (not isinstance(value, str) or not os.path.isabs(value)):
        raise ConfigError("state_dir", "an absolute directory path", value)
    return value
