"""Helpers shared by the checks of the deployment examples (docker-compose, Kubernetes): parse a
configuration the way the real commands do, and read the health probes."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sidecar.authz.config import parse_authz_config
from sidecar.broker.config import BrokerConfig, parse_broker_config
from sidecar.config_util import load_yaml_file, parse_listen, section
from sidecar.egress.config import parse_egress_config
from sidecar.identity.config import parse_identity_config
from sidecar.run_command import DEFAULT_ADMIN, _check_top_level

#: The probe every health check runs: ``python -c PROBE URL`` (the slim image has no curl).
PROBE_PREFIX = ["python", "-c"]


@dataclass(frozen=True)
class SidecarConfig:
    """What ``sidecar run -c FILE`` parses (see ``sidecar.run_command.serve``)."""

    identity: Any
    egress: Any
    authz: Any
    admin: tuple[str, int]


def load_sidecar_config(path: Path) -> SidecarConfig:
    """Parse ``path`` with the same parsers, in the same order, as ``sidecar run``."""
    data = load_yaml_file(path)
    _check_top_level(data)
    egress = parse_egress_config(data["egress"]) if data.get("egress") else None
    identity = None
    if data.get("identity") is not None:
        extra = egress.audiences if egress is not None else []
        identity = parse_identity_config(data["identity"], extra_audiences=extra)
    authz = parse_authz_config(data["authz"]) if data.get("authz") is not None else None
    admin = section(data.get("admin"), "admin")
    return SidecarConfig(
        identity=identity,
        egress=egress,
        authz=authz,
        admin=parse_listen(admin.get("listen", DEFAULT_ADMIN), "admin.listen"),
    )


def load_broker_config(path: Path) -> BrokerConfig:
    """Parse ``path`` as ``sidecar broker -c`` does."""
    return parse_broker_config(load_yaml_file(path))


def config_arg(command: list[str]) -> str:
    """The value of ``-c`` in a command line (``sidecar run -c X``, ``envoy -c X``)."""
    assert command.count("-c") == 1, f"expected exactly one -c in {shlex.join(command)}"
    return command[command.index("-c") + 1]


def option(command: list[str], name: str) -> str:
    assert command.count(name) == 1, f"expected exactly one {name} in {shlex.join(command)}"
    return command[command.index(name) + 1]


def probe_url(command: list[str], where: str) -> str:
    """The URL a health probe fetches; the probe must be the standard-library one."""
    assert command[:2] == PROBE_PREFIX and len(command) == 4, f"{where}: unexpected probe {command}"
    code = command[2]
    compile(code, f"<probe of {where}>", "exec")  # a typo would make the check always fail
    assert "urllib.request" in code and "sys.argv[1]" in code, f"{where}: probe code {code!r}"
    assert "ProxyHandler({})" in code, f"{where}: the probe must ignore proxy variables"
    return command[3]


def url_parts(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.hostname and parts.port, url
    return parts.hostname, parts.port, parts.path


def envoy_endpoints(bootstrap: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """Cluster name → (address, port) of its only endpoint."""
    out: dict[str, tuple[str, int]] = {}
    for cluster in bootstrap["static_resources"]["clusters"]:
        (locality,) = cluster["load_assignment"]["endpoints"]
        (endpoint,) = locality["lb_endpoints"]
        socket = endpoint["endpoint"]["address"]["socket_address"]
        out[cluster["name"]] = (socket["address"], int(socket["port_value"]))
    return out


def envoy_listener(bootstrap: dict[str, Any]) -> tuple[str, int]:
    (listener,) = bootstrap["static_resources"]["listeners"]
    socket = listener["address"]["socket_address"]
    return socket["address"], int(socket["port_value"])


def envoy_admin(bootstrap: dict[str, Any]) -> tuple[str, int]:
    socket = bootstrap["admin"]["address"]["socket_address"]
    return socket["address"], int(socket["port_value"])
