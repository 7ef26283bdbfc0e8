"""docker-compose.yml and deploy/compose/ against the demo's topology, without Docker.

There is no Docker engine on the build machines, so instead of ``docker compose up`` this
parses the compose file and checks everything it refers to: the services (the topology's, no
more), pods (shared network namespaces), published ports, mounts and the generated config
files, volumes, users and the broker's selectors, health checks and start order. The config
files are parsed with the parsers the real commands use and must agree with each other, and
real Envoy validates its bootstrap.
"""

from __future__ import annotations

import re
import subprocess
from graphlib import CycleError, TopologicalSorter
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from sidecar.broker.registry import unix_selectors
from sidecar.demo import compose
from sidecar.demo import topology as topo
from sidecar.observability.dashboards import DATASOURCE
from tests.integration import deploy_checks as checks
from tests.integration.harness import REPO_ROOT, validate_envoy_config
from tests.integration.live_metrics import promtool

COMPOSE_PATH = REPO_ROOT / compose.COMPOSE_FILE
COMPOSE_DIR = COMPOSE_PATH.parent
OUT_DIR = REPO_ROOT / compose.OUT_DIR
DOC: dict[str, Any] = yaml.safe_load(COMPOSE_PATH.read_text())
#: The demo's services; the ``observability`` profile's are checked apart (end of file).
SERVICES: dict[str, dict[str, Any]] = {
    name: service for name, service in DOC["services"].items() if "profiles" not in service
}
OBSERVABILITY: dict[str, dict[str, Any]] = {
    name: service for name, service in DOC["services"].items() if "profiles" in service
}
TOPOLOGY_SERVICES = {service for members in topo.PODS.values() for service in members}
P = compose.placement()
#: What each listening service's health check must probe: (port role, path).
HEALTH = {
    "broker": ("admin", "/readyz"),
    "orders": ("http", "/__health"),
    "envoy": ("admin", "/ready"),
    "orders-sidecar": ("admin", "/readyz"),
    "frontend-sidecar": ("admin", "/readyz"),
    "reports-sidecar": ("admin", "/readyz"),
}


def _owner(pod: str) -> str:
    """The service holding a pod's network namespace: its app (listed first in PODS)."""
    return topo.PODS[pod][0]


def _volumes(service: str) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of the short-syntax volumes of ``service``."""
    out = []
    for spec in DOC["services"][service].get("volumes", []):
        assert isinstance(spec, str), f"{service}: use the short volume syntax: {spec!r}"
        source, target, *mode = spec.split(":")
        out.append((source, target, mode == ["ro"]))
    return out


def _is_bind(source: str) -> bool:
    return source.startswith(("./", "../", "/"))


def _mounted_file(service: str, path: str) -> Path:
    """The host file behind ``path`` inside ``service`` (bind mounts only)."""
    for source, target, read_only in _volumes(service):
        if _is_bind(source) and target == path:
            assert read_only, f"{service}: {target} must be mounted read-only"
            return (COMPOSE_DIR / source).resolve()
    raise AssertionError(f"{service}: nothing is mounted at {path}")


def _config(name: str) -> Path:
    return OUT_DIR / name


def _generated() -> dict[str, dict[str, Any]]:
    return compose.configs()


# -- the generated files ---------------------------------------------------------------------


def test_committed_configs_are_exactly_what_the_generator_renders() -> None:
    rendered = compose.render_all()
    assert set(rendered) == set(compose.FILES)
    on_disk = {p.name for p in OUT_DIR.iterdir() if p.is_file()}
    assert on_disk == set(rendered), f"unexpected or missing files in {OUT_DIR}"
    stale = sorted(n for n, text in rendered.items() if _config(n).read_text() != text)
    assert not stale, f"stale {stale}: run `{compose.COMMAND}`"
    for name in rendered:
        assert _config(name).read_text().startswith("# GENERATED FILE"), name


def test_generator_check_mode_detects_a_stale_file(tmp_path: Path) -> None:
    assert compose.main(["--check"]) == 0
    assert compose.main(["--write", "--out-dir", str(tmp_path)]) == 0
    assert compose.main(["--check", "--out-dir", str(tmp_path)]) == 0
    edited = tmp_path / "broker.yaml"
    edited.write_text(edited.read_text().replace("ttl: 300", "ttl: 301"))
    assert compose.main(["--check", "--out-dir", str(tmp_path)]) == 1
    assert "ttl: 301" in edited.read_text(), "--check must not rewrite anything"


# -- services and pods -----------------------------------------------------------------------


def test_services_are_exactly_the_topology() -> None:
    assert set(SERVICES) == TOPOLOGY_SERVICES
    assert set(topo.DEFAULT_PORTS) <= TOPOLOGY_SERVICES
    assert set(DOC) <= {"name", "services", "volumes", "x-image", "x-probe", "x-health"}


def test_every_service_runs_the_one_image_non_root_and_read_only() -> None:
    dockerfile = REPO_ROOT / "Dockerfile"
    for name, service in SERVICES.items():
        assert service["build"] == ".", name
        assert (COMPOSE_DIR / service["build"] / "Dockerfile").resolve() == dockerfile, name
        assert service["image"] == "workload-identity-sidecar:local", name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert str(service.get("user", "")).split(":")[0] not in ("0", "root"), name


def test_pods_share_their_apps_network_namespace() -> None:
    for pod, members in topo.PODS.items():
        owner = _owner(pod)
        assert "network_mode" not in SERVICES[owner], f"{owner} owns pod {pod}'s namespace"
        for member in members[1:]:
            assert SERVICES[member].get("network_mode") == f"service:{owner}", member
    for name, service in SERVICES.items():
        mode = service.get("network_mode")
        if mode is not None:
            target = mode.removeprefix("service:")
            assert target in SERVICES and "network_mode" not in SERVICES[target], name
            assert "ports" not in service, f"{name}: ports belong to the pod's owner {target}"


def test_only_exposed_listeners_bind_all_interfaces() -> None:
    """In pods, everything but the broker's HTTP port and Envoy's ingress is loopback-only:
    nobody on the compose network can borrow an egress identity or skip Envoy."""
    for service, roles in topo.DEFAULT_PORTS.items():
        for role in roles:
            expected = "0.0.0.0" if (service, role) in topo.EXPOSED else "127.0.0.1"
            assert P.bind_address(service, role) == expected, (service, role)
    for caller in compose.CALLER_UIDS:
        for upstream in checks.load_sidecar_config(_config(f"{caller}.yaml")).egress.upstreams:
            role = _EGRESS_ROLES[upstream.target.name]
            assert upstream.listen == ("127.0.0.1", topo.DEFAULT_PORTS[caller][role]), caller


#: Egress upstream name → its port role: the access-token listener, and the WIMSE one.
_EGRESS_ROLES = {"orders": "egress", "orders-wimse": "wimse"}


def test_published_ports_are_the_exposed_listeners_on_loopback() -> None:
    published: set[tuple[str, str]] = set()
    for name, service in SERVICES.items():
        for spec in service.get("ports", []):
            match = re.fullmatch(r"127\.0\.0\.1:(\d+):(\d+)", str(spec))
            assert match, f"{name}: publish on 127.0.0.1 only, as HOST:CONTAINER ({spec!r})"
            host_port, port = int(match[1]), int(match[2])
            assert host_port == port, f"{name}: {spec} (the demo's default port on both sides)"
            pod = topo.pod_of(name)
            found = [
                (s, r)
                for s, r in topo.EXPOSED
                if topo.pod_of(s) == pod and topo.DEFAULT_PORTS[s][r] == port
            ]
            assert len(found) == 1, f"{name}: port {port} is no exposed listener of pod {pod}"
            published |= set(found)
    assert published == set(topo.EXPOSED)


# -- commands, mounts, volumes ---------------------------------------------------------------


def test_commands_read_the_generated_configs_through_read_only_mounts() -> None:
    by_service = {service: name for name, service in compose.FILES.items()}
    for name, service in SERVICES.items():
        command = service["command"]
        if name not in by_service:
            assert "-c" not in command, name
            continue
        path = checks.config_arg(command)
        assert PurePosixPath(path).parent == PurePosixPath(compose.CONFIG_DIR), name
        host_file = _mounted_file(name, path)
        assert host_file == _config(by_service[name]).resolve(), f"{name} reads {host_file}"
        assert host_file.is_file(), host_file
    for name in SERVICES:
        for source, _, _ in _volumes(name):
            if _is_bind(source):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"


def test_the_commands_are_the_topologys() -> None:
    assert SERVICES["broker"]["command"][:2] == ["sidecar", "broker"]
    assert SERVICES["envoy"]["command"][0] == "envoy"
    assert "--disable-hot-restart" in SERVICES["envoy"]["command"]
    for name in ("orders-sidecar", "frontend-sidecar", "reports-sidecar"):
        assert SERVICES[name]["command"][:2] == ["sidecar", "run"], name
    orders = SERVICES["orders"]["command"]
    assert orders[:3] == ["python", "-m", "sidecar.apps.echo"]
    assert checks.option(orders, "--host") == "127.0.0.1"  # only Envoy, in the pod, calls it
    assert int(checks.option(orders, "--port")) == P.port("orders", "http")
    assert checks.option(orders, "--name") == "orders"
    for client, sidecar in topo.LEGACY_CLIENTS.items():
        command = SERVICES[client]["command"]
        assert command[:3] == ["python", "-m", "sidecar.apps.legacy_client"], client
        host, port, path = checks.url_parts(checks.option(command, "--url"))
        assert (host, port) == ("127.0.0.1", P.port(sidecar, "egress")), client
        assert path.startswith(topo.ORDERS_PREFIX + "/"), client
        assert checks.option(command, "--name") == client


def test_named_volumes_are_declared_and_only_the_attestation_parties_mount_the_socket() -> None:
    declared = set(DOC.get("volumes") or {})
    used = {src for name in SERVICES for src, _, _ in _volumes(name) if not _is_bind(src)}
    assert used == declared == {compose.RUN_VOLUME}
    mounts = {
        name: (target, read_only)
        for name in SERVICES
        for source, target, read_only in _volumes(name)
        if source == compose.RUN_VOLUME
    }
    assert mounts == {
        "broker": (compose.RUN_DIR, False),
        "frontend-sidecar": (compose.RUN_DIR, True),
        "reports-sidecar": (compose.RUN_DIR, True),
    }


def test_callers_are_attested_by_uid_over_the_shared_socket() -> None:
    broker = checks.load_broker_config(_config("broker.yaml"))
    socket = broker.attestation_socket
    assert socket is not None and PurePosixPath(socket).parent == PurePosixPath(compose.RUN_DIR)
    assert PurePosixPath(broker.admin_socket).parent == PurePosixPath(compose.RUN_DIR)
    assert len(set(compose.CALLER_UIDS.values())) == len(compose.CALLER_UIDS)
    for name, uid in compose.CALLER_UIDS.items():
        service = SERVICES[name]
        assert str(service["user"]) == f"{uid}:{uid}", name
        # A peer outside the broker's pid namespace shows pid 0 and is refused.
        assert service["pid"] == "service:broker", name
        attestor = checks.load_sidecar_config(_config(f"{name}.yaml")).identity.attestor
        assert (attestor.kind, attestor.socket) == ("unix", socket), name
        # What the broker sees of this caller: uid/gid only (its executable belongs to another
        # uid, so /proc/<pid>/exe is unreadable to the broker).
        entry = broker.registry.match(unix_selectors(uid=uid, gid=uid, path=None, sha256=None))
        assert entry is not None and entry.spiffe_id == compose.CALLER_IDS[name], name
    others = {
        str(s.get("user", "")).split(":")[0]
        for n, s in SERVICES.items()
        if n not in compose.CALLER_UIDS
    }
    assert not others & {str(uid) for uid in compose.CALLER_UIDS.values()}
    for name in SERVICES:  # only the callers need the broker's pid namespace
        assert ("pid" in SERVICES[name]) == (name in compose.CALLER_UIDS), name


def test_dockerfile_prepares_the_run_directory_for_a_non_root_broker() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^RUN pip install .*\s\.\s", text, re.M), "the image installs the package"
    (user,) = re.findall(r"^USER (\S+)", text, re.M)
    uid = user.split(":")[0]
    assert uid not in ("0", "root")
    # A fresh named volume copies this directory's owner and mode: the broker's, 0755.
    assert re.search(rf"install -d -o {uid} -g \d+ -m 0755 {re.escape(compose.RUN_DIR)}\b", text)
    ignore = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {"*", "!pyproject.toml", "!README.md", "!sidecar"} <= set(ignore)


# -- health and start order ------------------------------------------------------------------


def test_every_listening_service_has_a_health_check_on_its_own_loopback() -> None:
    assert set(HEALTH) == set(topo.DEFAULT_PORTS)
    for name, service in SERVICES.items():
        if name not in HEALTH:
            assert "healthcheck" not in service, f"{name} listens on nothing to probe"
            continue
        check = service["healthcheck"]
        assert check["test"][0] == "CMD", name
        url = checks.probe_url(check["test"][1:], name)
        role, path = HEALTH[name]
        assert checks.url_parts(url) == ("127.0.0.1", P.port(name, role), path), name
        assert check["retries"] >= 3 and check["interval"] and check["timeout"], name


def test_depends_on_targets_exist_and_start_in_order() -> None:
    graph: dict[str, set[str]] = {}
    for name, service in SERVICES.items():
        deps: dict[str, Any] = service.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on with conditions"
        for target, how in deps.items():
            assert target in SERVICES, f"{name} depends on unknown {target}"
            condition = how["condition"]
            assert condition in ("service_healthy", "service_started"), (name, target)
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[target], f"{target} has no health check"
        # Joined namespaces are dependencies too: say so explicitly.
        for key in ("network_mode", "pid"):
            if key in service:
                assert service[key].removeprefix("service:") in deps, (name, key)
        graph[name] = set(deps)
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        raise AssertionError(f"depends_on has a cycle: {exc.args[1]}") from None

    def healthy(name: str, target: str) -> bool:
        return bool(
            SERVICES[name]["depends_on"].get(target, {}).get("condition") == "service_healthy"
        )

    assert healthy("orders-sidecar", "broker")  # its issuer's keys come from the broker
    assert healthy("envoy", "orders-sidecar") and healthy("envoy", "orders")
    for client, sidecar in topo.LEGACY_CLIENTS.items():
        assert healthy(sidecar, "broker"), sidecar
        assert healthy(client, "envoy"), client


# -- the configuration files agree with each other -------------------------------------------


def test_configs_parse_and_reference_each_other() -> None:
    broker = checks.load_broker_config(_config("broker.yaml"))
    issuer = f"http://broker:{P.port('broker', 'http')}"
    assert broker.issuer == issuer == topo.issuer(P)
    assert broker.listen == ("0.0.0.0", P.port("broker", "http"))
    assert broker.admin_listen == ("127.0.0.1", P.port("broker", "admin"))
    assert broker.clusters == ()  # unix attestation only
    assert {e.spiffe_id for e in broker.registry.entries} == set(compose.CALLER_IDS.values())
    for entry in broker.registry.entries:
        assert entry.allows_audience(topo.ORDERS_ID), entry.spiffe_id

    envoy: dict[str, Any] = yaml.safe_load(_config("envoy.yaml").read_text())
    ingress = checks.envoy_listener(envoy)
    assert ingress == ("0.0.0.0", P.port("envoy", "ingress"))
    endpoints = checks.envoy_endpoints(envoy)
    assert endpoints["app"] == ("127.0.0.1", P.port("orders", "http"))
    assert checks.envoy_admin(envoy) == ("127.0.0.1", P.port("envoy", "admin"))

    orders = checks.load_sidecar_config(_config("orders-sidecar.yaml"))
    assert orders.identity is None and orders.egress is None
    assert topo.ORDERS_ID in orders.authz.settings.audiences
    assert [s.location.issuer for s in orders.authz.sources] == [issuer]
    assert orders.authz.revocation_url == f"{issuer}/revocations"
    grpc_listen = orders.authz.grpc_listen
    assert grpc_listen is not None and not grpc_listen.is_unix
    assert endpoints["ext_authz"] == (grpc_listen.host, grpc_listen.port) == ("127.0.0.1", 9191)
    assert orders.admin == ("127.0.0.1", P.port("orders-sidecar", "admin"))
    policy = orders.authz.policy
    assert policy.allowing_rule(topo.FRONTEND_ID, "GET", "/orders/1") is not None
    assert policy.allowing_rule(topo.REPORTS_ID, "GET", "/orders/1") is None

    # Callers reach Envoy by the name of the pod it runs in: the service owning that namespace.
    envoy_host = SERVICES["envoy"]["network_mode"].removeprefix("service:")
    for name in compose.CALLER_UIDS:
        cfg = checks.load_sidecar_config(_config(f"{name}.yaml"))
        assert cfg.identity.issuer == issuer, name
        assert topo.ORDERS_ID in cfg.identity.audiences, name
        upstreams = {u.target.name: u for u in cfg.egress.upstreams}
        assert set(upstreams) == {n for n, r in _EGRESS_ROLES.items() if r in P.ports[name]}
        for upstream in upstreams.values():
            assert upstream.target.origin == f"http://{envoy_host}:{ingress[1]}", name
            # The origin callers sign their proofs for is one orders' sidecar answers to.
            assert upstream.target.origin in orders.authz.settings.authorities, name
            role = _EGRESS_ROLES[upstream.target.name]
            assert upstream.listen == ("127.0.0.1", P.port(name, role)), name
        assert upstreams["orders"].target.audience == topo.ORDERS_ID, name
        wimse = upstreams.get("orders-wimse")
        if wimse is not None:  # a WIT + WPT instead of a token, to a route orders allows
            assert wimse.target.wimse is not None and not wimse.target.audience, name
            assert policy.allowing_rule(topo.REPORTS_ID, "GET", topo.REPORTS_PREFIX + "/x")
        assert cfg.admin == ("127.0.0.1", P.port(name, "admin")), name
        assert cfg.authz is None, name


def test_generated_data_round_trips_through_the_files() -> None:
    """What the files say is what the generator meant (no YAML surprises on the way)."""
    for name, data in _generated().items():
        assert yaml.safe_load(_config(name).read_text()) == data, name


@pytest.mark.integration
def test_envoy_bootstrap_passes_envoy_validate() -> None:
    result = validate_envoy_config(_config("envoy.yaml"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"envoy --mode validate failed:\n{output}"
    assert "OK" in output, output
    assert "deprecated" not in output.lower(), output


# -- the observability profile ---------------------------------------------------------------


def _flag(service: str, name: str) -> str:
    values = [a.split("=", 1)[1] for a in OBSERVABILITY[service]["command"] if a.startswith(name)]
    assert len(values) == 1, f"{service}: {name}"
    return str(values[0])


def test_observability_profile_services() -> None:
    agents = {f"metrics-{pod}" for pod in topo.PODS}
    assert set(OBSERVABILITY) == {"prometheus", "grafana"} | agents
    for name, service in OBSERVABILITY.items():
        assert service["profiles"] == ["observability"], name
        for spec in service.get("ports", []):
            assert spec.startswith("127.0.0.1:"), f"{name}: {spec} must publish on loopback"
        for source, target, read_only in _volumes(name):
            assert _is_bind(source) and read_only, f"{name}: {target}"
            assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"


def test_each_pods_agent_scrapes_its_admin_listeners_over_loopback() -> None:
    """Admin listeners stay pod-local: the agent joins the pod and pushes to Prometheus."""
    assert "--web.enable-remote-write-receiver" in OBSERVABILITY["prometheus"]["command"]
    for pod in topo.PODS:
        name = f"metrics-{pod}"
        service = OBSERVABILITY[name]
        assert service["network_mode"] == f"service:{_owner(pod)}", name
        assert "--enable-feature=agent" in service["command"], name
        config_file = _mounted_file(name, _flag(name, "--config.file"))
        assert config_file == _config(f"{name}.yaml").resolve(), name
        config = yaml.safe_load(config_file.read_text())
        scraped = {
            job["job_name"]: target
            for job in config["scrape_configs"]
            for group in job["static_configs"]
            for target in group["targets"]
        }
        expected = {s for s in compose.SCRAPED if topo.pod_of(s) == pod}
        assert set(scraped) == expected, name
        for job, target in scraped.items():
            assert target == f"127.0.0.1:{P.port(job, 'admin')}", name
            assert P.listen(job, "admin") == target, f"{job}: admin must stay pod-local"
        urls = [w["url"] for w in config["remote_write"]]
        assert urls == [compose.PROMETHEUS_URL] and "//prometheus:" in urls[0], name
        listen = _flag(name, "--web.listen-address")
        assert listen.startswith("127.0.0.1:"), name
        pod_ports = {port for s in topo.PODS[pod] for port in P.ports.get(s, {}).values()}
        assert int(listen.rsplit(":", 1)[1]) not in pod_ports, f"{name}: port taken in {pod}"
    # Every sidecar process (Envoy's admin has Envoy's own statistics, which no rule uses).
    with_admin = {s for s in TOPOLOGY_SERVICES if "admin" in P.ports.get(s, {})}
    assert set(compose.SCRAPED) == with_admin - {"envoy"}


def test_prometheus_loads_the_checked_rules(tmp_path: Path) -> None:
    """The rule files Prometheus is given are the ones promtool tests; ``promtool check
    config`` accepts its configuration (rule paths mapped to the mounted files) and the
    agents'."""
    tool = promtool()
    config_file = _mounted_file("prometheus", _flag("prometheus", "--config.file"))
    config = yaml.safe_load(config_file.read_text())
    hosts = [_mounted_file("prometheus", path) for path in config["rule_files"]]
    rules_dir = REPO_ROOT / "deploy" / "observability"
    assert hosts == [(rules_dir / name).resolve() for name in compose.RULE_FILES]
    config["rule_files"] = [str(h) for h in hosts]
    checked = tmp_path / "prometheus.yaml"
    checked.write_text(yaml.safe_dump(config))
    agents = [_config(f"metrics-{pod}.yaml") for pod in topo.PODS]
    done = subprocess.run(
        [tool, "check", "config", str(checked), *map(str, agents)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_provisions_prometheus_and_the_generated_dashboards() -> None:
    mounts = {target: source for source, target, _ in _volumes("grafana")}
    provisioning = {
        kind: COMPOSE_DIR / mounts[f"/etc/grafana/provisioning/{kind}"]
        for kind in ("datasources", "dashboards")
    }
    sources = [
        d
        for f in sorted(provisioning["datasources"].glob("*.yaml"))
        for d in yaml.safe_load(f.read_text())["datasources"]
    ]
    assert [(d["type"], d["uid"]) for d in sources] == [("prometheus", DATASOURCE.uid)]
    assert sources[0]["url"] == "http://prometheus:9090"
    assert "prometheus" in OBSERVABILITY
    providers = [
        p
        for f in sorted(provisioning["dashboards"].glob("*.yaml"))
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    assert len(providers) == 1
    folder = providers[0]["options"]["path"]
    dashboards = (COMPOSE_DIR / mounts[folder]).resolve()
    assert dashboards == (REPO_ROOT / "deploy/observability/grafana/dashboards").resolve()
    assert sorted(p.name for p in dashboards.glob("*.json")) == ["sidecar-slo.json"]


def _compose_cli() -> list[str] | None:
    """``docker compose`` (v2 plugin) or ``docker-compose``, if this machine has one."""
    import shutil

    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    found = shutil.which("docker-compose")
    return [found] if found else None


@pytest.mark.parametrize("profile", [None, "observability"])
def test_docker_compose_config_accepts_the_file(profile: str | None) -> None:
    """Issue 11.10: Compose's own parser over the file (and the observability profile)."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip(
            "no compose CLI here (docker compose / docker-compose): the checks above stand in"
        )
    profiles = ["--profile", profile] if profile else []
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE_PATH), *profiles, "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
