"""The documentation keeps up with the code.

* Every YAML file under ``examples/`` is accepted by the parser of the command it is for.
* The README's configuration reference lists every key the parsers accept, and nothing else.
  The accepted keys are not written down here: the parsers are run on configurations that
  reach every section while ``known_keys`` is recorded, so a key added to a parser shows up
  here without anyone remembering this test. Defaults in the reference are compared with the
  values the parsers produce when a key is left out.
* Every deny reason (with its status and ``WWW-Authenticate`` error), every egress and broker
  error code, every metric (with its type and labels) and every subcommand option appear in
  the README.

Failures name what is missing or wrong. No sockets, no processes.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import sidecar.authz.config
import sidecar.authz.policy
import sidecar.authz.trust_domains
import sidecar.authz.wimse
import sidecar.broker.config
import sidecar.broker.registry
import sidecar.egress.config
import sidecar.egress.wimse
import sidecar.identity.config
import sidecar.net_limits
from sidecar import config_util, run_command
from sidecar.authz.config import AuthzConfig, parse_authz_config
from sidecar.authz.core import Authorizer, AuthzSettings
from sidecar.authz.nonce import NonceService
from sidecar.authz.policy import empty_policy
from sidecar.authz.replay import InMemoryReplayStore
from sidecar.broker.codes import OAuthCode
from sidecar.broker.config import TOP_KEYS, BrokerConfig, parse_broker_config
from sidecar.broker.metrics import BrokerMetrics
from sidecar.cli import build_parser
from sidecar.config_util import load_yaml_file, parse_listen, section
from sidecar.egress.config import parse_egress_config
from sidecar.egress.metrics import EgressMetrics
from sidecar.errors import Reason
from sidecar.identity.config import parse_identity_config
from sidecar.identity.metrics import IdentityMetrics
from sidecar.identity.schedule import RefreshPolicy
from sidecar.jose.jwks import KeyStore
from sidecar.net_limits import ConnLimits, connection_metrics
from sidecar.observability.metrics import AuthzMetrics, process_metrics
from tests.tls_pki import LocalPKI

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"
PACKAGE = ROOT / "sidecar"

SIDECAR_HEADING = "### Sidecar:"
BROKER_HEADING = "### Broker:"

#: ``sidecar run`` and ``sidecar authz`` read only ``listen`` from their ``admin`` section (no
#: ``known_keys`` there to record): see run_command.serve and authz/command.py.
ADMIN_KEYS = {"admin.listen"}

ISSUER = "http://127.0.0.1:8443"
ORDERS = "spiffe://demo.local/ns/shop/sa/orders"
CLUSTER = {
    "issuer": "https://k8s.example",
    "jwks_file": "/nonexistent/jwks.json",
    "audiences": ["sidecar-broker"],
}
UNIX_ENTRY = {
    "spiffe_id": "spiffe://demo.local/host/a",
    "selectors": ["unix:uid:1000"],
    "audiences": ["**"],
}


# -- reading the README ------------------------------------------------------------------------


def readme() -> str:
    return README.read_text(encoding="utf-8")


def section_text(text: str, heading_prefix: str) -> str:
    """From the heading line starting with ``heading_prefix`` to the next heading of the same
    or a higher level."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(heading_prefix)]
    assert len(starts) == 1, f"README.md: expected one heading starting {heading_prefix!r}"
    level = len(heading_prefix) - len(heading_prefix.lstrip("#"))
    out = [lines[starts[0]]]
    in_code = False
    for line in lines[starts[0] + 1 :]:
        if line.startswith("```"):
            in_code = not in_code
        heading = re.match(r"(#+) ", line)
        if not in_code and heading and len(heading.group(1)) <= level:
            break
        out.append(line)
    return "\n".join(out)


def _cells(line: str) -> list[str]:
    inner = line.strip()[1:-1] if line.strip().endswith("|") else line.strip()[1:]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def tables(text: str) -> Iterator[tuple[list[str], list[list[str]]]]:
    """Markdown tables as (header cells, rows of cells)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if (
            lines[i].startswith("|")
            and i + 1 < len(lines)
            and re.fullmatch(r"\|[-:| ]+\|", lines[i + 1].strip())
        ):
            header = _cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            yield header, rows
        else:
            i += 1


def rows_by_key(text: str, first_column: str) -> dict[str, list[str]]:
    """Rows of the tables whose first header cell is ``first_column``, keyed by the backticked
    name in their first cell: {name: [the other cells]}."""
    out: dict[str, list[str]] = {}
    for header, rows in tables(text):
        if header[0] != first_column:
            continue
        for cells in rows:
            match = re.fullmatch(r"`([^`]+)`", cells[0])
            assert match, f"README.md: a {first_column!r} cell is not one `name`: {cells[0]!r}"
            assert match.group(1) not in out, f"README.md: {match.group(1)} is listed twice"
            out[match.group(1)] = cells[1:]
    return out


# -- what the parsers accept --------------------------------------------------------------------

PARSER_MODULES = (
    sidecar.authz.config,
    sidecar.authz.policy,
    sidecar.authz.trust_domains,
    sidecar.authz.wimse,
    sidecar.broker.config,
    sidecar.broker.registry,
    sidecar.egress.config,
    sidecar.egress.wimse,
    sidecar.identity.config,
    sidecar.net_limits,
    config_util,
)


def parse_run(data: dict[str, Any]) -> dict[str, Any]:
    """What ``sidecar run`` validates before it starts anything (run_command.serve)."""
    run_command._check_top_level(data)
    egress = parse_egress_config(data["egress"]) if data.get("egress") else None
    identity = None
    if data.get("identity") is not None:
        identity = parse_identity_config(
            data["identity"], extra_audiences=egress.audiences if egress else []
        )
    authz = parse_authz_config(data["authz"]) if data.get("authz") is not None else None
    assert identity is not None or authz is not None, "sidecar run needs egress or authz"
    admin = section(data.get("admin"), "admin")
    parse_listen(admin.get("listen", run_command.DEFAULT_ADMIN), "admin.listen")
    return {"egress": egress, "identity": identity, "authz": authz}


def parse_authz_command(data: dict[str, Any]) -> AuthzConfig:
    """What ``sidecar authz`` validates (authz/command.py)."""
    cfg = parse_authz_config(data.get("authz"))
    admin = section(data.get("admin"), "admin")
    parse_listen(admin.get("listen", run_command.DEFAULT_ADMIN), "admin.listen")
    return cfg


def _sidecar_full(attestor: dict[str, Any]) -> dict[str, Any]:
    """Every section of a ``sidecar run`` file, every list with an item. The ``tls`` blocks
    are empty (system trust): their keys are recorded without certificate files."""
    identity_tls: dict[str, Any] = {"tls": {}} if attestor["type"] == "k8s" else {}
    return {
        "identity": {"issuer": ISSUER, "attestor": attestor, "refresh": {}, **identity_tls},
        "egress": {
            "upstreams": [
                {
                    "listen": "127.0.0.1:15001",
                    "upstream": "http://127.0.0.1:10000",
                    "audience": ORDERS,
                },
                {
                    "listen": "127.0.0.1:15002",
                    "upstream": "http://127.0.0.1:10000",
                    "auth": "wimse",
                    "wimse": {},
                },
                {
                    "listen": "127.0.0.1:15003",
                    "upstream": "https://orders.example",
                    "audience": ORDERS,
                    "tls": {},
                },
            ],
            "forward_proxy": {
                "listen": "127.0.0.1:15080",
                "destinations": [
                    {"match": "orders.shop:80", "audience": ORDERS, "tls": {}},
                    {"match": "pay.shop:80", "auth": "wimse"},
                ],
            },
            "timeouts": {},
        },
        "authz": {
            "audience": ORDERS,
            "issuers": [{"issuer": ISSUER, "tls": {}}],
            "trust_domains": [
                {"name": "example.org", "bundle_file": "/nonexistent/b.json"},
                {"name": "example.com", "bundle_endpoint": "https://b.example/", "tls": {}},
            ],
            "grpc": {},
            "http": {},
            "dpop": {},
            "nonce": {"secret": "0123456789abcdef"},
            "replay": {},
            "limits": {},
            "revocation": {"url": f"{ISSUER}/revocations", "tls": {}},
            "authorities": ["https://orders.example"],
            "wimse": {},
            "routes": [{"prefix": "/orders"}, {"prefix": "/w", "auth": "wimse"}],
            "rules": [{"principals": [ORDERS]}],
        },
        "admin": {},
    }


SIDECAR_FULL = [
    _sidecar_full({"type": "unix"}),
    _sidecar_full({"type": "k8s"}),
    _sidecar_full({"type": "file", "path": "/nonexistent/token.jwt"}),
    _sidecar_full({"type": "spiffe", "socket": "unix:///nonexistent/agent.sock"}),
]
BROKER_FULL = {
    "keys": {},
    "tokens": {},
    "dpop": {},
    "attestation": {},
    "clusters": [
        CLUSTER,
        {"issuer": "https://k8s2.example", "audiences": ["sidecar-broker"], "tls": {}},
    ],
    "entries": [UNIX_ENTRY, {**UNIX_ENTRY, "selectors": ["k8s:ns:shop"]}],
    "revocation": {},
    "audit": {},
    "admin": {},
}


def _record(
    monkeypatch: pytest.MonkeyPatch, parse: Callable[[dict[str, Any]], object], configs: list[Any]
) -> dict[str, set[str]]:
    """{section path with ``[]`` for list items: the keys ``known_keys`` accepted there}."""
    seen: dict[str, set[str]] = {}
    original = config_util.known_keys

    def record(data: Any, key: str, allowed: set[str]) -> None:
        seen.setdefault(re.sub(r"\[\d+\]", "[]", key), set()).update(allowed)
        original(data, key, allowed)

    for module in PARSER_MODULES:
        assert module.known_keys is original, f"{module.__name__} no longer uses known_keys"
        monkeypatch.setattr(module, "known_keys", record)
    for config in configs:
        parse(config)
        # The configuration reached every section it has (else the recording would miss one).
        for path in _mapping_paths(config):
            assert path in seen or path == "admin", f"no known_keys check recorded at {path}"
    return seen


def _mapping_paths(node: Any, path: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        if path:
            yield path
        for key, value in node.items():
            yield from _mapping_paths(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for item in node:
            yield from _mapping_paths(item, f"{path}[]")


#: A TLS client block inside a section (``authz.issuers[].tls``): documented as one row, its
#: keys once in the README's "TLS client blocks" table (the broker's own top-level ``tls``, a
#: server block, is listed key by key).
NESTED_TLS = re.compile(r"(.+\.tls)\.(\w+)")
TLS_HEADING = "#### TLS client blocks"


def _accepted(seen: dict[str, set[str]], top: set[str]) -> set[str]:
    keys = set(top)
    for path, allowed in seen.items():
        keys |= {f"{path}.{k}" for k in allowed}
    return keys


def _fold_tls(keys: set[str]) -> tuple[set[str], set[str]]:
    """(keys with each nested TLS block as one key, the keys seen inside those blocks)."""
    folded, inner = set(), set()
    for key in keys:
        match = NESTED_TLS.fullmatch(key)
        if match is None:
            folded.add(key)
        else:
            folded.add(match.group(1))
            inner.add(match.group(2))
    return folded, inner


def sidecar_keys(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    seen = _record(monkeypatch, parse_run, SIDECAR_FULL)
    return _accepted(seen, set(run_command.TOP_LEVEL)) | ADMIN_KEYS


def broker_keys(monkeypatch: pytest.MonkeyPatch, tls: dict[str, str]) -> set[str]:
    """``tls``: the broker's server block (it needs real certificate files)."""
    seen = _record(monkeypatch, parse_broker_config, [{**BROKER_FULL, "tls": tls}])
    return _accepted(seen, set(TOP_KEYS))


def _check_reference(accepted: set[str], documented: set[str], where: str) -> None:
    def covered(key: str) -> bool:
        return key in documented or any(d.startswith((key + ".", key + "[]")) for d in documented)

    missing = sorted(k for k in accepted if not covered(k))
    assert not missing, f"README.md {where}: keys the parsers accept but not documented: {missing}"
    unknown = sorted(d for d in documented if d not in accepted)
    assert not unknown, f"README.md {where}: documented keys the parsers do not accept: {unknown}"


# -- (a) examples parse -------------------------------------------------------------------------

EXAMPLE_PARSERS: dict[str, Callable[[dict[str, Any]], object]] = {
    "authz.yaml": parse_authz_command,  # sidecar authz -c examples/authz.yaml
    "sidecar.yaml": parse_run,  # sidecar run -c examples/sidecar.yaml
    "broker.yaml": parse_broker_config,  # sidecar broker -c examples/broker.yaml
}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.y*ml")), ids=lambda p: p.name)
def test_example_parses(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith(config_util.ENV_PREFIX)]:
        monkeypatch.delenv(name)
    parse = EXAMPLE_PARSERS.get(path.name)
    if parse is None:
        pytest.fail(f"examples/{path.name}: no parser known for it; add it to EXAMPLE_PARSERS")
    parse(load_yaml_file(path))


def test_every_example_exists() -> None:
    missing = sorted(n for n in EXAMPLE_PARSERS if not (EXAMPLES / n).is_file())
    assert not missing, f"examples/ lacks {missing}"


def test_broker_example_shows_every_section() -> None:
    data = load_yaml_file(EXAMPLES / "broker.yaml")
    text = (EXAMPLES / "broker.yaml").read_text(encoding="utf-8")
    absent = sorted(k for k in TOP_KEYS if k not in data and f"\n{k}:" not in text)
    assert not absent, f"examples/broker.yaml does not show the sections {absent}"
    cfg = parse_broker_config(data)
    kinds = {s.split(":", 1)[0] for e in cfg.registry.entries for s in e.selectors}
    assert kinds == {"unix", "k8s"}, f"examples/broker.yaml entries use selectors of {kinds}"
    sources = {"file" if c.location.file else "discovery" for c in cfg.clusters}
    assert {"file", "discovery"} <= sources, f"examples/broker.yaml clusters use {sources}"


# -- (b) the configuration reference ------------------------------------------------------------


def test_sidecar_reference_lists_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    documented = rows_by_key(section_text(readme(), SIDECAR_HEADING), "key")
    keys, _ = _fold_tls(sidecar_keys(monkeypatch))
    _check_reference(keys, set(documented), "sidecar run/authz reference")


def test_broker_reference_lists_every_key(
    monkeypatch: pytest.MonkeyPatch, local_pki: LocalPKI
) -> None:
    documented = rows_by_key(section_text(readme(), BROKER_HEADING), "key")
    pki = local_pki
    tls = {
        "cert_file": str(pki.server_cert),
        "key_file": str(pki.server_key),
        "client_ca_file": str(pki.ca_file),
    }
    keys, _ = _fold_tls(broker_keys(monkeypatch, tls))
    _check_reference(keys, set(documented), "broker reference")


def test_tls_client_block_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every nested ``tls`` block accepts the keys of the README's TLS client block table,
    and the section names every place that takes one."""
    text = section_text(readme(), TLS_HEADING)
    blocks, inner = _fold_tls(sidecar_keys(monkeypatch))
    assert inner, "no nested tls block was recorded: update SIDECAR_FULL"
    documented = set(rows_by_key(text, "tls key"))
    assert documented == inner, f"README.md {TLS_HEADING}: lists {documented}, parsers {inner}"
    places = sorted(k for k in blocks if k.endswith(".tls"))
    unnamed = [k for k in [*places, "clusters[].tls"] if f"`{k}`" not in text]
    assert not unnamed, f"README.md {TLS_HEADING} does not name {unnamed}"


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value == "":
        return '""'
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return f"{value[0]}:{value[1]}"  # a parsed listen address
    return str(value)


def _cell_list(cell: str) -> set[str] | None:
    match = re.search(r"`\[([^\]`]*)\]`", cell)
    if match is None:
        return None
    return {item.strip() for item in match.group(1).split(",") if item.strip()}


def _check_defaults(documented: dict[str, list[str]], expected: dict[str, Any]) -> None:
    wrong = []
    for key, value in expected.items():
        if key not in documented:
            wrong.append(f"{key}: not documented")
            continue
        cell = documented[key][1]  # type, DEFAULT, meaning
        if isinstance(value, set | frozenset | list):
            if _cell_list(cell) != {str(v) for v in value}:
                wrong.append(f"{key}: README says {cell!r}, the parser's default is {value}")
        elif value is None:
            if "none" not in cell and "—" not in cell:
                wrong.append(f"{key}: README says {cell!r}, the parser's default is unset")
        elif f"`{_shown(value)}`" not in cell:
            wrong.append(f"{key}: README says {cell!r}, the parser's default is `{_shown(value)}`")
    assert not wrong, "README.md defaults differ from the code:\n" + "\n".join(wrong)


def test_sidecar_reference_defaults() -> None:
    documented = rows_by_key(section_text(readme(), SIDECAR_HEADING), "key")
    a = parse_authz_config(
        {"audience": ORDERS, "issuers": [{"issuer": ISSUER}], "routes": [{"prefix": "/x"}]}
    )
    issuer = a.settings.issuers[ISSUER]
    td = parse_authz_config(
        {"audience": ORDERS, "trust_domains": [{"name": "example.org", "bundle_file": "/b"}]}
    ).trust_domains[0]
    e = parse_egress_config(
        {"upstreams": [{"listen": "127.0.0.1:1", "upstream": "http://h", "audience": ORDERS}]}
    )
    w = (
        parse_egress_config(
            {"upstreams": [{"listen": "127.0.0.1:1", "upstream": "http://h", "auth": "wimse"}]}
        )
        .upstreams[0]
        .target.wimse
    )
    assert w is not None
    unix = parse_identity_config({"attestor": {"type": "unix"}})
    k8s = parse_identity_config({"issuer": ISSUER, "attestor": {"type": "k8s"}})
    file = parse_identity_config({"attestor": {"type": "file", "path": "/x"}})
    expected: dict[str, Any] = {
        "authz.issuers[].algorithms": issuer.algorithms,
        "authz.issuers[].token_types": issuer.token_types,
        "authz.issuers[].refresh_interval": a.sources[0].refresh_interval,
        "authz.issuers[].min_refresh_interval": a.sources[0].min_refresh_interval,
        "authz.trust_domains": list(a.trust_domains),
        "authz.trust_domains[].algorithms": td.algorithms,
        "authz.trust_domains[].insecure_http": False,
        "authz.trust_domains[].workload_api": td.workload_api,
        "authz.trust_domains[].refresh_interval": td.refresh_interval,
        "authz.trust_domains[].min_refresh_interval": td.min_refresh_interval,
        "authz.grpc.enabled": a.grpc_listen is not None,
        "authz.grpc.listen": a.grpc_listen,
        "authz.http.enabled": a.http_listen is not None,
        "authz.http.listen": a.http_listen,
        "authz.http.path_prefix": a.http_path_prefix,
        "authz.default_scheme": a.default_scheme,
        "authz.leeway": a.settings.leeway,
        "authz.dpop.algorithms": a.settings.dpop.algorithms,
        "authz.dpop.max_age": a.settings.dpop.max_age,
        "authz.dpop.future_leeway": a.settings.dpop.future_leeway,
        "authz.nonce.required": a.policy.default_route.nonce,
        "authz.nonce.window": a.nonce_window,
        "authz.replay.backend": a.replay_backend,
        "authz.replay.capacity": a.replay_capacity,
        "authz.limits.max_token_bytes": a.settings.max_token_bytes,
        "authz.limits.max_proof_bytes": a.settings.dpop.max_bytes,
        "authz.token_cache_size": a.settings.token_cache_size,
        "authz.unknown_kid_wait": a.unknown_kid_wait,
        "authz.revocation.interval": a.revocation_interval,
        "authz.revocation.wait": a.revocation_wait,
        "authz.routes[].auth": a.policy.routes[0].auth,
        "authz.wimse.profile": "wit-svid" if a.settings.wimse.wit.svid else "wit",
        "authz.wimse.max_proof_lifetime": a.settings.wimse.wpt.max_lifetime,
        "authz.wimse.accept_proof_header": a.settings.wimse.accept_proof_header,
        "authz.wimse.other_tokens": sorted(a.settings.wimse.wpt.other_tokens),
        "egress.upstreams[].auth": "token" if e.upstreams[0].target.wimse is None else "wimse",
        "egress.upstreams[].wimse.proof_header": w.proof_header,
        "egress.upstreams[].wimse.proof_lifetime": w.proof_lifetime,
        "egress.upstreams[].wimse.other_tokens": list(w.other_tokens),
        "egress.on_existing_authorization": e.on_existing_authorization,
        "egress.x_forwarded": e.x_forwarded,
        "egress.via": e.via,
        "egress.timeouts.connect": e.timeouts.connect,
        "egress.timeouts.total": e.timeouts.total,
        "egress.timeouts.read": e.timeouts.read,
        "egress.nonce_retry_buffer": e.nonce_retry_buffer,
        "egress.max_connections": e.max_connections,
        "egress.keepalive_timeout": e.keepalive_timeout,
        "identity.attestor.socket": unix.attestor.socket,
        "identity.attestor.timeout": unix.attestor.timeout,
        "identity.attestor.token_file": k8s.attestor.token_file,
        "identity.attestor.subject_token_type": k8s.attestor.subject_token_type,
        "identity.attestor.poll_interval": file.attestor.poll_interval,
        "identity.audiences": list(unix.audiences),
        "identity.require_dpop": unix.require_dpop,
        "admin.listen": run_command.DEFAULT_ADMIN,
    }
    policy = RefreshPolicy()
    for name in RefreshPolicy.__dataclass_fields__:
        expected[f"identity.refresh.{name}"] = getattr(policy, name)
    assert unix.policy == policy, "identity.refresh defaults are not RefreshPolicy's"
    expected |= _connection_defaults("egress.connections", e.connections)
    expected |= _connection_defaults("authz.http.connections", a.http_connections)
    expected |= _connection_defaults("authz.grpc.connections", a.grpc_connections)
    _check_defaults(documented, expected)


def _connection_defaults(path: str, limits: ConnLimits) -> dict[str, Any]:
    keys = ["max_connections", "header_timeout", "body_timeout", "idle_timeout"]
    if limits.max_per_uid:
        keys.append("max_per_uid")
    return {f"{path}.{k}": getattr(limits, k) for k in keys}


def test_broker_reference_defaults() -> None:
    documented = rows_by_key(section_text(readme(), BROKER_HEADING), "key")
    b: BrokerConfig = parse_broker_config({"clusters": [CLUSTER]})
    s = b.keys.schedule
    cluster = b.clusters[0]
    expected: dict[str, Any] = {
        "issuer": b.issuer,
        "listen": b.listen,
        "keys.algorithm": s.alg,
        "keys.rotate_every": s.rotate_every,
        "keys.prepublish": s.prepublish,
        "keys.retire_grace": s.retain_for - max(b.max_token_ttl, b.wit_ttl),
        "keys.jwks_max_age": b.keys.jwks_max_age,
        "tokens.ttl": b.token_ttl,
        "tokens.wit_ttl": b.wit_ttl,
        "tokens.subject_leeway": b.subject_leeway,
        "tokens.max_subject_token_bytes": b.max_subject_token_bytes,
        "dpop.algorithms": b.dpop.algorithms,
        "dpop.max_age": b.dpop.max_age,
        "dpop.future_leeway": b.dpop.future_leeway,
        "dpop.max_proof_bytes": b.dpop.max_bytes,
        "dpop.replay_capacity": b.replay_capacity,
        "attestation.enabled": b.attestation_socket is not None,
        "attestation.socket": b.attestation_socket,
        "clusters[].algorithms": cluster.algorithms,
        "clusters[].refresh_interval": cluster.refresh_interval,
        "clusters[].min_refresh_interval": cluster.min_refresh_interval,
        "admin.enabled": b.admin_listen is not None,
        "admin.listen": b.admin_listen,
        "admin.socket": b.admin_socket,
        "revocation.max_wait": b.revocation_max_wait,
        "revocation.max_waiting": b.revocation_max_waiting,
    }
    expected |= _connection_defaults("connections", b.http_connections)
    expected |= _connection_defaults("attestation.connections", b.attestation_connections)
    _check_defaults(documented, expected)


def test_env_overrides_documented(tmp_path: Path) -> None:
    text = section_text(readme(), "## Configuration reference")
    assert config_util.ENV_PREFIX in text, "README.md: the environment overrides are missing"
    examples = re.findall(r"^(SIDECAR__\w+)=(\S+)\s+# (?:broker: )?([\w.]+)$", text, re.M)
    assert examples, "README.md: no `SIDECAR__X=value   # x` example of an override"
    for name, value, dotted in examples:
        data: dict[str, Any] = {}
        if name.endswith("_FILE"):  # the example's path stands for a mounted secret
            value = str(tmp_path / "value")
            Path(value).write_text("a value in a file\n")
        config_util.apply_env_overrides(data, {name: value})
        node: Any = data
        for part in dotted.split("."):
            assert isinstance(node, dict) and part in node, (
                f"README.md: {name} does not set {dotted}"
            )
            node = node[part]


# -- (c) reasons, error codes, metrics, commands -----------------------------------------------


def _authorizer() -> Authorizer:
    return Authorizer(
        AuthzSettings(audiences=frozenset({ORDERS}), issuers={}),
        keys=KeyStore(),
        policy=empty_policy(),
        replay=InMemoryReplayStore(10),
        nonces=NonceService(b"0123456789abcdef", window=30, context=ORDERS),
    )


def test_every_deny_reason_documented() -> None:
    documented = rows_by_key(section_text(readme(), "## Deny reason codes"), "reason")
    missing = sorted(r.value for r in Reason if r.value not in documented)
    assert not missing, f"README.md deny reason table lacks {missing}"
    unknown = sorted(set(documented) - {r.value for r in Reason})
    assert not unknown, f"README.md deny reason table lists codes that do not exist: {unknown}"
    authorizer = _authorizer()
    wrong = []
    for reason in Reason:
        status_cell, error_cell = documented[reason.value][:2]
        # The deny the core builds for a request that used the DPoP scheme on a DPoP route,
        # from a caller whose token was verified (``sub`` known).
        meta = {"sub": "spiffe://example.org/caller"}
        deny = authorizer._deny(reason, "x", authorizer.policy.default_route, "dpop", 0.0, meta)
        headers = dict(deny.headers)
        if status_cell != str(deny.status):
            wrong.append(f"{reason.value}: status {status_cell}, the core answers {deny.status}")
        match = re.search(r'error="([^"]+)"', headers.get("www-authenticate", ""))
        expected = f"`{match.group(1)}`" if match else "—"
        if expected not in error_cell:
            wrong.append(f"{reason.value}: error cell {error_cell!r} lacks {expected}")
        body_error = json.loads(deny.body)["error"]
        if match is None and body_error != reason.value and f"`{body_error}`" not in error_cell:
            wrong.append(f"{reason.value}: error cell {error_cell!r} lacks body `{body_error}`")
        for header in ("dpop-nonce", "retry-after"):
            if header in headers and header not in error_cell.lower():
                wrong.append(f"{reason.value}: error cell {error_cell!r} lacks {header}")
    assert not wrong, "README.md deny reason table differs from the core:\n" + "\n".join(wrong)


def _calls(path: Path, name: str) -> Iterator[ast.Call]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if called == name:
                yield node


def _const(node: ast.expr | None) -> Any:
    return node.value if isinstance(node, ast.Constant) else None


def test_every_egress_answer_documented() -> None:
    found: dict[str, set[int]] = {}
    for call in _calls(PACKAGE / "egress" / "proxy.py", "_LocalAnswer"):
        status, code = _const(call.args[0]), _const(call.args[1])
        assert isinstance(code, str) and isinstance(status, int), ast.unparse(call)
        found.setdefault(code, set()).add(status)
    assert found, "no _LocalAnswer(...) found in sidecar/egress/proxy.py: update this test"
    documented = rows_by_key(section_text(readme(), "### Egress proxy answers"), "code")
    missing = sorted(set(found) - set(documented))
    assert not missing, f"README.md egress answers table lacks {missing}"
    unknown = sorted(set(documented) - set(found))
    assert not unknown, (
        f"README.md egress answers table lists codes the proxy never sends: {unknown}"
    )
    wrong = [
        f"{code}: {documented[code][0]!r} lacks {s}"
        for code, statuses in found.items()
        for s in statuses
        if str(s) not in documented[code][0]
    ]
    assert not wrong, f"README.md egress answer statuses differ from the code: {wrong}"


def _oauth_code(node: ast.expr) -> object:
    """``OAuthCode.NAME`` (the broker's closed set) as its value; a literal as itself."""
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "OAuthCode"
    ):
        return OAuthCode[node.attr].value
    return _const(node)


def test_every_broker_oauth_error_documented() -> None:
    found: dict[str, set[int]] = {}
    for path in sorted((PACKAGE / "broker").glob("*.py")):
        for call in _calls(path, "OAuthError"):
            code = _oauth_code(call.args[0]) if call.args else None
            if not isinstance(code, str):
                continue
            status = next((_const(k.value) for k in call.keywords if k.arg == "status"), 400)
            found.setdefault(code, set()).add(status)
    assert found, "no OAuthError(...) found in sidecar/broker: update this test"
    documented = rows_by_key(section_text(readme(), "### Broker token endpoint errors"), "error")
    missing = sorted(set(found) - set(documented))
    assert not missing, f"README.md broker error table lacks {missing}"
    unknown = sorted(set(documented) - set(found))
    assert not unknown, (
        f"README.md broker error table lists codes the broker never sends: {unknown}"
    )
    wrong = [
        f"{code}: {documented[code][0]!r} lacks {s}"
        for code, statuses in found.items()
        for s in statuses
        if str(s) not in documented[code][0]
    ]
    assert not wrong, f"README.md broker error statuses differ from the code: {wrong}"


#: prometheus_client constructors (and our helpers around Gauge) → the type they register.
METRIC_CALLS = {
    "Counter": "counter",
    "Gauge": "gauge",
    "Histogram": "histogram",
    "Summary": "summary",
    "CounterMetricFamily": "counter",
    "GaugeMetricFamily": "gauge",
    "HistogramMetricFamily": "histogram",
    "SummaryMetricFamily": "summary",
    "gauge": "gauge",  # BrokerMetrics.gauge
    "cache_gauge": "gauge",  # AuthzMetrics.cache_gauge
    "TallyCounter": "counter",  # sidecar.observability.check_tally
    "TallyHistogram": "histogram",
}


def _exposed(name: str, kind: str) -> str:
    return name.removesuffix("_total") + "_total" if kind == "counter" else name


def metrics_in_code() -> dict[str, tuple[str, tuple[str, ...]]]:
    """{exposed metric name: (type, label names)} for every metric the package registers."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for called, kind in METRIC_CALLS.items():
            for call in _calls(path, called):
                name = _const(call.args[0]) if call.args else None
                if not isinstance(name, str) or not name.startswith("sidecar_"):
                    continue
                labels_node = next(
                    (k.value for k in call.keywords if k.arg in ("labelnames", "labels")),
                    call.args[2] if len(call.args) > 2 else None,  # Counter(name, doc, labels)
                )
                labels: tuple[str, ...] = ()
                if isinstance(labels_node, ast.List | ast.Tuple):
                    labels = tuple(_const(e) for e in labels_node.elts)
                found[_exposed(name, kind)] = (kind, labels)
    return found


def metrics_at_runtime() -> dict[str, str]:
    """{exposed name: type} of what the metrics classes register when built."""
    registry = CollectorRegistry()
    AuthzMetrics(registry)
    BrokerMetrics(registry)
    EgressMetrics(registry)
    IdentityMetrics(registry).watch_expiry(lambda: [("aud", 1.0, True)])
    connection_metrics(registry).open.labels("admin").set(0)
    return {_exposed(m.name, m.type): m.type for m in registry.collect()}


def test_metric_scan_sees_what_the_metric_classes_register() -> None:
    scanned = metrics_in_code()
    runtime = metrics_at_runtime()
    missed = sorted(n for n in runtime if n not in scanned or scanned[n][0] != runtime[n])
    assert not missed, f"the source scan of this test misses (or mistypes) {missed}"


def test_every_metric_documented() -> None:
    code = metrics_in_code()
    documented = rows_by_key(section_text(readme(), "## Metrics"), "metric")
    missing = sorted(set(code) - set(documented))
    assert not missing, f"README.md metrics tables lack {missing}"
    unknown = sorted(set(documented) - set(code))
    assert not unknown, f"README.md metrics tables list metrics the code does not have: {unknown}"
    wrong = []
    for name, (kind, labels) in code.items():
        type_cell, labels_cell = documented[name][:2]
        if type_cell != kind:
            wrong.append(f"{name}: type {type_cell!r}, the code registers a {kind}")
        shown = re.findall(r"(?:^|, )`(\w+)`", labels_cell)
        if tuple(shown) != labels:
            wrong.append(f"{name}: labels {shown}, the code has {list(labels)}")
    assert not wrong, "README.md metrics differ from the code:\n" + "\n".join(wrong)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_command_and_option_documented() -> None:
    text = section_text(readme(), "## Command line")
    commands: list[tuple[str, argparse.ArgumentParser]] = [("sidecar", build_parser())]
    for name, sub in _subcommands(build_parser()).items():
        commands.append((f"sidecar {name}", sub))
        commands += [(f"sidecar {name} {n}", p) for n, p in _subcommands(sub).items()]
    missing = []
    for command, parser in commands:
        if f"`{command}" not in text:
            missing.append(command)
        for action in parser._actions:
            longest = max(action.option_strings, key=len, default=None)
            if longest is not None and longest != "--help" and longest not in text:
                missing.append(f"{command} {longest}")
    assert not missing, f"README.md command line section lacks {missing}"


def test_two_commands_and_demo_placeholder() -> None:
    text = readme()
    for needle in (
        "./scripts/demo",
        "./scripts/test",
        "sidecar demo --keep-running",
        "<!-- demo-output -->",
        "deploy/README.md",
        "docker compose up --build",
    ):
        assert needle in text, f"README.md lacks {needle!r}"
    assert (ROOT / "scripts" / "test").is_file(), "scripts/test is gone"


def test_process_collectors_documented() -> None:
    """The families of prometheus_client's collectors every /metrics carries (not ``sidecar_``,
    so the source scan above does not see them) are named in the README's metrics section."""
    registry = CollectorRegistry()
    process_metrics(registry)
    names = {_exposed(m.name, m.type) for m in registry.collect()}
    assert {"process_cpu_seconds_total", "python_info", "sidecar_build_info"} <= names
    text = section_text(readme(), "## Metrics")
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"README.md metrics section lacks {missing}"


def test_operations_section_troubleshoots_every_deny_reason() -> None:
    text = section_text(readme(), "### Troubleshooting a deny")
    missing = sorted(r.value for r in Reason if f"`{r.value}`" not in text)
    assert not missing, f"README.md Operations troubleshooting lacks {missing}"
    assert "(#deny-reason-codes)" in text, "link the deny reason table"
