"""The ``identity`` section: which attestor, the issuer, audiences to prefetch, refresh tuning.

    identity:
      issuer: http://127.0.0.1:8443       # OIDC issuer (k8s: discovery starts here)
      attestor:
        type: unix                        # unix | k8s | file
        socket: /run/sidecar/broker.sock  # unix: the broker's attestation socket
      audiences: [spiffe://demo.local/ns/shop/sa/orders]
      refresh: {min_remaining: 5, backoff_max: 30}

Every error names the offending key (``identity.attestor.socket``) and what it expects.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.config_source import keep_going, report
from sidecar.config_util import (
    get_bool,
    get_choice,
    get_duration,
    get_num,
    get_opt_str,
    get_opt_url,
    get_str,
    get_str_list,
    known_keys,
    parse_tls_client,
    section,
)
from sidecar.errors import ConfigError
from sidecar.identity.attestors import Attestor, FileAttestor, K8sAttestor, UnixAttestor
from sidecar.identity.clock_offset import ClockOffsets
from sidecar.identity.rfc8693_exchange import JWT_TOKEN_TYPE
from sidecar.identity.schedule import RefreshPolicy
from sidecar.identity.spiffe_attestor import SpiffeAttestor
from sidecar.jose.rfc9449_dpop import ProofSigner
from sidecar.tls_settings import TLSClient

ATTESTOR_KEYS = {
    "unix": {"type", "socket", "timeout"},
    "k8s": {
        "type",
        "token_file",
        "token_endpoint",
        "subject_token_type",
        "requested_token_type",
        "scope",
        "client_id",
        "timeout",
    },
    "file": {"type", "path", "poll_interval"},
    "spiffe": {"type", "socket", "timeout"},
}
DEFAULT_K8S_TOKEN_FILE = "/var/run/secrets/tokens/sidecar-token"
#: The broker's default attestation socket (``sidecar broker``: attestation.socket).
DEFAULT_BROKER_SOCKET = "/tmp/sidecar-broker/attestation.sock"


@dataclass(frozen=True, slots=True)
class AttestorConfig:
    kind: str
    socket: str | None = None
    token_file: str | None = None
    token_endpoint: str | None = None
    subject_token_type: str = JWT_TOKEN_TYPE
    requested_token_type: str | None = None
    scope: str | None = None
    client_id: str | None = None
    path: str | None = None
    poll_interval: float = 10.0
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    issuer: str | None
    attestor: AttestorConfig
    audiences: tuple[str, ...]
    policy: RefreshPolicy
    require_dpop: bool
    public_jwk_file: str | None
    #: Trust for https calls to the issuer (discovery, token endpoint).
    tls: TLSClient | None = None

    def build_attestor(
        self,
        signer: ProofSigner,
        clock: Callable[[], float] = time.time,
        offsets: ClockOffsets | None = None,
    ) -> Attestor:
        a = self.attestor
        if a.kind == "unix":
            assert a.socket is not None
            return UnixAttestor(
                a.socket,
                signer,
                clock=clock,
                timeout=a.timeout,
                require_dpop=self.require_dpop,
                offsets=offsets,
            )
        if a.kind == "k8s":
            assert a.token_file is not None
            return K8sAttestor(
                issuer=self.issuer or "",
                token_file=a.token_file,
                signer=signer,
                clock=clock,
                timeout=a.timeout,
                token_endpoint=a.token_endpoint,
                subject_token_type=a.subject_token_type,
                requested_token_type=a.requested_token_type,
                scope=a.scope,
                client_id=a.client_id,
                require_dpop=self.require_dpop,
                offsets=offsets,
                tls=self.tls,
            )
        if a.kind == "spiffe":
            return SpiffeAttestor(a.socket, timeout=a.timeout, clock=clock)
        assert a.path is not None
        return FileAttestor(a.path, signer, clock=clock, poll_interval=a.poll_interval)


def _attestor(raw: Any, path: str) -> AttestorConfig:
    data = section(raw, path)
    kinds = tuple(ATTESTOR_KEYS)
    kind = get_choice(data, "type", path, kinds, "") if data else ""
    if not kind:
        raise ConfigError(f"{path}.type", f"one of {list(kinds)} (required)")
    known_keys(data, path, ATTESTOR_KEYS[kind])
    timeout = get_duration(data, "timeout", path, 5.0, minimum=0.1)
    if kind == "unix":
        socket = get_str(data, "socket", path, DEFAULT_BROKER_SOCKET)
        return AttestorConfig(kind, socket=socket, timeout=timeout)
    if kind == "spiffe":
        # None: SPIFFE_ENDPOINT_SOCKET, read when the attestor first connects.
        socket_uri = get_opt_str(data, "socket", path)
        if socket_uri is not None and not socket_uri.startswith("unix://"):
            raise ConfigError(f"{path}.socket", "a unix:///path", socket_uri)
        return AttestorConfig(kind, socket=socket_uri, timeout=timeout)
    if kind == "k8s":
        endpoint = get_opt_url(data, "token_endpoint", path)
        return AttestorConfig(
            kind,
            token_file=get_str(data, "token_file", path, DEFAULT_K8S_TOKEN_FILE),
            token_endpoint=endpoint,
            subject_token_type=get_str(data, "subject_token_type", path, JWT_TOKEN_TYPE),
            requested_token_type=get_opt_str(data, "requested_token_type", path),
            scope=get_opt_str(data, "scope", path),
            client_id=get_opt_str(data, "client_id", path),
            timeout=timeout,
        )
    return AttestorConfig(
        kind,
        path=get_str(data, "path", path),
        poll_interval=get_duration(data, "poll_interval", path, 10.0, minimum=0.1),
    )


def _policy(raw: Any, path: str) -> RefreshPolicy:
    data = section(raw, path)
    d = RefreshPolicy()
    known_keys(data, path, set(RefreshPolicy.__dataclass_fields__))
    max_interval = data.get("max_interval")
    policy = RefreshPolicy(
        refresh_fraction=get_num(data, "refresh_fraction", path, d.refresh_fraction, minimum=0.05),
        jitter=get_num(data, "jitter", path, d.jitter),
        min_remaining=get_duration(data, "min_remaining", path, d.min_remaining),
        min_remaining_fraction=get_num(
            data, "min_remaining_fraction", path, d.min_remaining_fraction
        ),
        min_interval=get_duration(data, "min_interval", path, d.min_interval, minimum=0.05),
        max_interval=None
        if max_interval is None
        else get_duration(data, "max_interval", path, 0.1, minimum=0.1),
        backoff_initial=get_duration(
            data, "backoff_initial", path, d.backoff_initial, minimum=0.01
        ),
        backoff_max=get_duration(data, "backoff_max", path, d.backoff_max, minimum=0.05),
        demand_interval=get_duration(
            data, "demand_interval", path, d.demand_interval, minimum=0.05
        ),
        fetch_timeout=get_duration(data, "fetch_timeout", path, d.fetch_timeout, minimum=0.1),
        request_wait=get_duration(data, "request_wait", path, d.request_wait),
    )
    for name in ("refresh_fraction", "jitter", "min_remaining_fraction"):
        if getattr(policy, name) >= 1.0:
            report(ConfigError(f"{path}.{name}", "a number below 1", getattr(policy, name)))
    if policy.backoff_max < policy.backoff_initial:
        report(
            ConfigError(f"{path}.backoff_max", "a duration >= backoff_initial", policy.backoff_max)
        )
    return policy


def _tls(root: Mapping[str, Any], path: str, kind: str) -> TLSClient | None:
    if root.get("tls") is not None and kind != "k8s":
        raise ConfigError(
            f"{path}.tls", f"no tls block with attestor type {kind}: only k8s calls the issuer"
        )
    return parse_tls_client(root.get("tls"), f"{path}.tls")


def parse_identity_config(
    data: Any, *, extra_audiences: list[str] | None = None, path: str = "identity"
) -> IdentityConfig:
    """``extra_audiences`` (the egress upstreams') are prefetched along with ``audiences``."""
    root: Mapping[str, Any] = section(data, path)
    known_keys(
        root,
        path,
        {"issuer", "attestor", "audiences", "refresh", "require_dpop", "public_jwk_file", "tls"},
    )
    issuer = get_opt_url(root, "issuer", path)
    attestor = AttestorConfig("file", path="")
    with keep_going():
        attestor = _attestor(root.get("attestor"), f"{path}.attestor")
    if attestor.kind == "k8s" and issuer is None and attestor.token_endpoint is None:
        raise ConfigError(f"{path}.issuer", "the issuer URL (k8s discovery starts there)")
    audiences = get_str_list(root, "audiences", path, [])
    audiences += [a for a in extra_audiences or [] if a not in audiences]
    return IdentityConfig(
        issuer=issuer,
        attestor=attestor,
        audiences=tuple(audiences),
        policy=_policy(root.get("refresh"), f"{path}.refresh"),
        require_dpop=get_bool(root, "require_dpop", path, True),
        public_jwk_file=get_opt_str(root, "public_jwk_file", path),
        tls=_tls(root, path, attestor.kind),
    )
