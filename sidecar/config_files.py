"""The three kinds of configuration file, each parsed whole with every mistake reported at once.

* ``sidecar`` — ``sidecar run``: ``identity``, ``egress``, ``authz``, ``admin``;
* ``authz`` — ``sidecar authz``: ``authz``, ``admin``;
* ``broker`` — ``sidecar broker``: the broker's top-level keys.

``sidecar check`` and each command's ``--check`` use the same parsers as the commands, so a
file that passes the check starts (listeners permitting).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sidecar.config_source import collecting, keep_going, report
from sidecar.config_util import parse_admin_listen
from sidecar.errors import ConfigError
from sidecar.listen_address import ListenAddress

if TYPE_CHECKING:
    from sidecar.authz.config import AuthzConfig
    from sidecar.broker.config import BrokerConfig
    from sidecar.egress.config import EgressConfig
    from sidecar.identity.config import IdentityConfig

RUN_SECTIONS = ("identity", "egress", "authz", "admin")
AUTHZ_SECTIONS = ("authz", "admin")


@dataclass(frozen=True, slots=True)
class RunConfig:
    """What ``sidecar run`` starts."""

    egress: EgressConfig | None
    identity: IdentityConfig | None
    authz: AuthzConfig | None
    admin: tuple[str, int]


@dataclass(frozen=True, slots=True)
class AuthzFile:
    """What ``sidecar authz`` starts."""

    authz: AuthzConfig
    admin: ListenAddress


def check_sections(data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in data:
        if key not in allowed:
            report(ConfigError(str(key), f"one of the top-level sections {list(allowed)}"))


def parse_run_file(data: Mapping[str, Any]) -> RunConfig:
    from sidecar.authz.config import parse_authz_config
    from sidecar.egress.config import parse_egress_config
    from sidecar.identity.config import parse_identity_config

    egress = identity = authz = None
    admin = ("", 0)
    with collecting(data):
        check_sections(data, RUN_SECTIONS)
        with keep_going():
            egress = parse_egress_config(data.get("egress")) if data.get("egress") else None
        audiences = egress.audiences if egress is not None else []
        with keep_going():
            if data.get("identity") is not None:
                identity = parse_identity_config(data["identity"], extra_audiences=audiences)
            elif audiences:
                raise ConfigError(
                    "identity", "an identity section (the egress upstreams need tokens)"
                )
        if egress is not None and identity is not None:
            from sidecar.egress.wimse import check_attestor

            with keep_going():
                check_attestor(egress.wimse_keys, identity.attestor.kind)
        with keep_going():
            if data.get("authz") is not None:
                authz = parse_authz_config(data["authz"])
                if authz.workers != 1:
                    raise ConfigError(
                        "authz.workers", "1 under `sidecar run` (worker processes: `sidecar authz`)"
                    )
        if not any(data.get(k) is not None for k in ("egress", "identity", "authz")):
            raise ConfigError("egress", "an egress (with identity) or an authz section to run")
        admin = parse_admin_listen(data)
    return RunConfig(egress=egress, identity=identity, authz=authz, admin=admin)


def parse_authz_file(data: Mapping[str, Any]) -> AuthzFile:
    from sidecar.authz.config import parse_authz_config

    authz: AuthzConfig | None = None
    admin = ListenAddress()
    with collecting(data):
        check_sections(data, AUTHZ_SECTIONS)
        with keep_going():
            authz = parse_authz_config(data.get("authz"))
        admin = ListenAddress(*parse_admin_listen(data))
    assert authz is not None  # collecting raised otherwise
    return AuthzFile(authz=authz, admin=admin)


def parse_broker_file(data: Mapping[str, Any]) -> BrokerConfig:
    from sidecar.broker.config import parse_broker_config

    return parse_broker_config(data)


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    command: str
    parse: Callable[[Mapping[str, Any]], Any]
    summary: Callable[[Any], str]


def _run_summary(cfg: RunConfig) -> str:
    parts = []
    if cfg.identity is not None:
        parts.append(f"identity ({cfg.identity.attestor.kind} attestor)")
    if cfg.egress is not None:
        parts.append(f"egress ({len(cfg.egress.upstreams)} upstreams)")
    if cfg.authz is not None:
        parts.append(_authz_parts(cfg.authz))
    return ", ".join(parts)


def _authz_parts(cfg: AuthzConfig) -> str:
    return (
        f"authz ({len(cfg.sources)} issuers, {len(cfg.trust_domains)} trust domains, "
        f"{len(cfg.policy.routes)} routes)"
    )


def _broker_summary(cfg: BrokerConfig) -> str:
    return (
        f"broker issuer {cfg.issuer} ({len(cfg.clusters)} clusters, "
        f"{len(cfg.registry.entries)} entries)"
    )


KINDS = {
    "sidecar": Kind("sidecar", "sidecar run", parse_run_file, _run_summary),
    "authz": Kind("authz", "sidecar authz", parse_authz_file, lambda f: _authz_parts(f.authz)),
    "broker": Kind("broker", "sidecar broker", parse_broker_file, _broker_summary),
}


def detect_kind(data: Mapping[str, Any]) -> str:
    """The kind a file's top-level keys name: broker keys → ``broker``; ``identity`` or
    ``egress`` → ``sidecar``; ``authz`` alone → ``authz``."""
    from sidecar.broker.config import TOP_KEYS

    keys = set(data)
    if keys & (TOP_KEYS - {"admin"}):
        return "broker"
    if keys & {"identity", "egress"}:
        return "sidecar"
    if "authz" in keys:
        return "authz"
    raise ConfigError(
        "config file", "top-level keys of a sidecar, authz or broker file (or pass --kind)"
    )
