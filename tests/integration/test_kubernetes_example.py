"""deploy/kubernetes/ against the demo's topology, without a cluster.

Parses the kustomization and every manifest it lists, then checks what a cluster would only
tell us at run time: volumes and mounts, the ConfigMaps (generated from the topology) behind
each command's ``-c``, the projected service-account token (path, audience, lifetime) against
the sidecar's attestor and the broker's cluster block and registration entry, Services vs.
container ports vs. the URLs in the configs, probes, and the restricted security settings.
Configs are parsed by the commands' own parsers; real Envoy validates its bootstrap.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.broker.registry import k8s_selectors
from sidecar.demo import kubernetes as k8s
from sidecar.demo import topology as topo
from tests.integration import deploy_checks as checks
from tests.integration.harness import REPO_ROOT, validate_envoy_config

EXAMPLE = REPO_ROOT / k8s.EXAMPLE_DIR
OUT_DIR = REPO_ROOT / k8s.OUT_DIR
KUSTOMIZATION: dict[str, Any] = yaml.safe_load((EXAMPLE / "kustomization.yaml").read_text())
#: ConfigMaps the user creates (not generated): name → keys.
EXTERNAL_CONFIGMAPS = {"cluster-jwks": {"jwks.json"}}
IMAGE = "workload-identity-sidecar:local"
P = k8s.placement()
#: (Deployment, container) → the rendered config it reads (by its role in k8s.FILES).
CONFIG_OF = {
    ("broker", "broker"): "broker",
    ("orders", "sidecar"): "orders-sidecar",
    ("orders", "envoy"): "envoy",
    ("frontend", "sidecar"): "frontend-sidecar",
}
#: (Deployment, container) → what its readiness probe fetches: (topology service, role, path).
#: Exec probes on loopback: the app (reached only through Envoy) and Envoy (its admin can stop
#: it).
PROBES = {
    ("orders", "app"): ("orders", "http", "/__health"),
    ("orders", "envoy"): ("envoy", "admin", "/ready"),
}
#: HTTP probes on the admin listener bound to the pod IP (port "metrics"), also scraped.
ADMIN_PROBED = {
    ("broker", "broker"): ("broker", "admin"),
    ("orders", "sidecar"): ("orders-sidecar", "admin"),
    ("frontend", "sidecar"): ("frontend-sidecar", "admin"),
}
#: The Kubernetes version the manifests are validated against (native sidecars are GA in 1.33).
KUBERNETES_VERSION = "1.33.0"


def _load_objects() -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for resource in KUSTOMIZATION["resources"]:
        for doc in yaml.safe_load_all((EXAMPLE / resource).read_text()):
            if doc is None:
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{key} defined twice"
            out[key] = doc
    return out


OBJECTS = _load_objects()
#: Generated ConfigMap name → {key: file on disk}.
GENERATED = {
    gen["name"]: {posixpath.basename(f): EXAMPLE / f for f in gen["files"]}
    for gen in KUSTOMIZATION["configMapGenerator"]
}


def _pod(deployment: str) -> dict[str, Any]:
    spec: dict[str, Any] = OBJECTS[("Deployment", deployment)]["spec"]["template"]["spec"]
    return spec


def _containers(deployment: str) -> dict[str, dict[str, Any]]:
    """Every container of the pod, native sidecars (init containers) included."""
    pod = _pod(deployment)
    return {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}


def _volumes(deployment: str) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in _pod(deployment).get("volumes", [])}


def _config_file(role: str) -> Path:
    (name,) = [n for n, r in k8s.FILES.items() if r == role]
    return OUT_DIR / name


def _file_behind(deployment: str, container: str, path: str) -> Path:
    """The generated file a container sees at ``path`` (through a ConfigMap volume)."""
    for mount in _containers(deployment)[container].get("volumeMounts", []):
        if posixpath.dirname(path) == mount["mountPath"]:
            volume = _volumes(deployment)[mount["name"]]
            assert mount.get("readOnly") is True, f"{deployment}/{container}: {path} read-only"
            files = GENERATED[volume["configMap"]["name"]]
            key = posixpath.basename(path)
            assert key in files, f"{deployment}/{container}: no key {key} in {volume}"
            return Path(files[key])
    raise AssertionError(f"{deployment}/{container}: nothing mounted at {posixpath.dirname(path)}")


# -- the generated files ---------------------------------------------------------------------


def test_committed_configs_are_exactly_what_the_generator_renders(tmp_path: Path) -> None:
    rendered = k8s.render_all()
    assert set(rendered) == set(k8s.FILES)
    assert {p.name for p in OUT_DIR.iterdir()} == set(rendered)
    stale = sorted(n for n, text in rendered.items() if (OUT_DIR / n).read_text() != text)
    assert not stale, f"stale {stale}: run `{k8s.COMMAND}`"
    assert k8s.main(["--check"]) == 0
    (tmp_path / "envoy.yaml").write_text("# edited by hand\n")
    assert k8s.main(["--check", "--out-dir", str(tmp_path)]) == 1
    for name, data in k8s.configs().items():
        assert yaml.safe_load((OUT_DIR / name).read_text()) == data, name


def test_kustomization_generates_one_configmap_per_rendered_file() -> None:
    assert KUSTOMIZATION["namespace"] == topo.NAMESPACE
    for resource in KUSTOMIZATION["resources"]:
        assert (EXAMPLE / resource).is_file(), resource
    files = [path for keys in GENERATED.values() for path in keys.values()]
    assert sorted(p.resolve() for p in files) == sorted((OUT_DIR / n).resolve() for n in k8s.FILES)
    assert not set(GENERATED) & set(EXTERNAL_CONFIGMAPS)


# -- objects ---------------------------------------------------------------------------------


def test_the_objects_of_the_example() -> None:
    assert set(OBJECTS) == {
        ("Namespace", topo.NAMESPACE),
        ("ServiceAccount", "broker"),
        ("ServiceAccount", "orders"),
        ("ServiceAccount", topo.FRONTEND_SA),
        ("Deployment", "broker"),
        ("Deployment", "orders"),
        ("Deployment", "frontend"),
        ("Service", "broker"),
        ("Service", "orders"),
    }
    api = {"Namespace": "v1", "ServiceAccount": "v1", "Service": "v1", "Deployment": "apps/v1"}
    for (kind, name), obj in OBJECTS.items():
        assert obj["apiVersion"] == api[kind], (kind, name)
        if kind != "Namespace":
            assert obj["metadata"]["namespace"] == topo.NAMESPACE, (kind, name)
    labels = OBJECTS[("Namespace", topo.NAMESPACE)]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_deployments_mount_exactly_their_volumes() -> None:
    for (kind, name), obj in OBJECTS.items():
        if kind != "Deployment":
            continue
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        volumes = _volumes(name)
        mounted: set[str] = set()
        for cname, container in _containers(name).items():
            paths = [m["mountPath"] for m in container.get("volumeMounts", [])]
            assert len(paths) == len(set(paths)), f"{name}/{cname}: a path mounted twice"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}/{cname}: no volume {mount['name']}"
                mounted.add(mount["name"])
        assert mounted == set(volumes), f"{name}: unused volumes {set(volumes) - mounted}"
        for vname, volume in volumes.items():
            if "configMap" in volume:
                cm = volume["configMap"]["name"]
                assert cm in GENERATED or cm in EXTERNAL_CONFIGMAPS, f"{name}: {vname} -> {cm}"


def test_every_container_is_locked_down_and_runs_the_image() -> None:
    for (kind, name), _ in OBJECTS.items():
        if kind != "Deployment":
            continue
        pod = _pod(name)
        assert pod["automountServiceAccountToken"] is False, name
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0, name
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod.get("shareProcessNamespace", False) is False, name
        for cname, container in _containers(name).items():
            assert container["image"] == IMAGE, (name, cname)
            sec = container["securityContext"]
            assert sec["allowPrivilegeEscalation"] is False, (name, cname)
            assert sec["readOnlyRootFilesystem"] is True, (name, cname)
            assert sec["capabilities"] == {"drop": ["ALL"]}, (name, cname)
    for sa in ("broker", "orders", topo.FRONTEND_SA):
        assert OBJECTS[("ServiceAccount", sa)]["automountServiceAccountToken"] is False, sa


def test_commands_read_the_generated_configs() -> None:
    for (deployment, container), role in CONFIG_OF.items():
        command = _containers(deployment)[container]["command"]
        path = checks.config_arg(command)
        assert _file_behind(deployment, container, path).resolve() == _config_file(role).resolve()
    commands = {
        (d, c): spec["command"]
        for d in ("broker", "orders", "frontend")
        for c, spec in _containers(d).items()
    }
    assert set(commands) == set(CONFIG_OF) | {("orders", "app"), ("frontend", "app")}
    # JSON logs in a cluster: one object per line for the log collector.
    assert commands[("broker", "broker")][:4] == ["sidecar", "--log-format", "json", "broker"]
    assert commands[("orders", "envoy")][0] == "envoy"
    assert commands[("orders", "sidecar")][:4] == commands[("frontend", "sidecar")][:4]
    assert commands[("orders", "sidecar")][:4] == ["sidecar", "--log-format", "json", "run"]
    app = commands[("orders", "app")]
    assert app[:3] == ["python", "-m", "sidecar.apps.echo"]
    assert checks.option(app, "--host") == "127.0.0.1"
    assert int(checks.option(app, "--port")) == P.port("orders", "http")
    client = commands[("frontend", "app")]
    assert client[:3] == ["python", "-m", "sidecar.apps.legacy_client"]
    host, port, path = checks.url_parts(checks.option(client, "--url"))
    assert (host, port) == ("127.0.0.1", P.port("frontend-sidecar", "egress"))
    assert path.startswith(topo.ORDERS_PREFIX + "/")


def test_readiness_probes_hit_each_containers_loopback() -> None:
    for (deployment, container), (service, role, path) in PROBES.items():
        probe = _containers(deployment)[container]["readinessProbe"]
        url = checks.probe_url(probe["exec"]["command"], f"{deployment}/{container}")
        assert checks.url_parts(url) == ("127.0.0.1", P.port(service, role), path)
    assert "readinessProbe" not in _containers("frontend")["app"]  # it listens on nothing


def _named_port(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container.get("ports", []) if p["name"] == name]
    return int(port)


def test_admin_listeners_are_probed_over_http_and_scraped_on_the_pod_ip() -> None:
    """Issue 11.10: HTTP probes on the admin port (no exec probe), a scrapeable metrics port;
    the admin listener is bound to all interfaces in the config so the kubelet reaches it."""
    for (deployment, container), (service, role) in ADMIN_PROBED.items():
        spec = _containers(deployment)[container]
        where = f"{deployment}/{container}"
        assert _named_port(spec, "metrics") == P.port(service, role), where
        assert P.bind_address(service, role) == "0.0.0.0", where
        probes = {
            k: spec[k] for k in ("readinessProbe", "livenessProbe", "startupProbe") if k in spec
        }
        assert {"readinessProbe", "livenessProbe"} <= set(probes), where
        for kind, probe in probes.items():
            assert "exec" not in probe, f"{where} {kind}: an exec probe"
            path = "/healthz" if kind == "livenessProbe" else "/readyz"
            assert probe["httpGet"] == {"path": path, "port": "metrics"}, (where, kind)
        annotations = OBJECTS[("Deployment", deployment)]["spec"]["template"]["metadata"][
            "annotations"
        ]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == P.port(service, role), where
        assert annotations["prometheus.io/path"] == "/metrics"
    # Envoy's admin (it can drain and quit Envoy) stays on loopback.
    assert P.bind_address("envoy", "admin") == "127.0.0.1"


def test_the_admin_http_listener_only_reads() -> None:
    """What the pod IP now exposes: GET routes only (the broker's revocation API is on its
    unix admin socket, not here)."""
    from prometheus_client import CollectorRegistry

    from sidecar.observability.admin import make_admin_app

    app = make_admin_app(CollectorRegistry(), lambda: (True, "ok"))
    methods = {route.method for route in app.router.routes()}
    assert methods <= {"GET", "HEAD"}, methods


def test_sidecars_are_native_sidecars_the_apps_wait_for() -> None:
    for deployment in ("orders", "frontend"):
        pod = _pod(deployment)
        (sidecar,) = pod["initContainers"]
        assert sidecar["name"] == "sidecar" and sidecar["restartPolicy"] == "Always"
        assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
        assert "sidecar" not in {c["name"] for c in pod["containers"]}


def test_every_container_has_resource_requests_and_limits() -> None:
    for deployment in ("broker", "orders", "frontend"):
        for cname, spec in _containers(deployment).items():
            resources = spec.get("resources", {})
            for part in ("requests", "limits"):
                assert set(resources.get(part, {})) == {"cpu", "memory"}, (deployment, cname, part)


def test_manifests_pass_the_kubernetes_schema() -> None:
    """Every object against the OpenAPI schema of a pinned Kubernetes version, strictly
    (an unknown or misplaced field fails)."""
    import kubernetes_validate  # type: ignore[import-untyped]

    for (kind, name), obj in OBJECTS.items():
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{kind}/{name}: {exc.message} at {list(exc.path)}") from None


def test_the_schema_check_catches_a_misplaced_field() -> None:
    import kubernetes_validate

    broken = yaml.safe_load(yaml.safe_dump(OBJECTS[("Deployment", "orders")]))
    broken["spec"]["template"]["spec"]["initContainers"][0]["restartPolicy"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# -- identity: the projected token, the broker's cluster block and entry ---------------------


def test_projected_token_matches_the_sidecar_and_the_broker() -> None:
    pod = _pod("frontend")
    assert pod["serviceAccountName"] == topo.FRONTEND_SA
    sidecar = checks.load_sidecar_config(_config_file("frontend-sidecar"))
    attestor = sidecar.identity.attestor
    assert attestor.kind == "k8s" and attestor.token_file == k8s.TOKEN_FILE

    projected = [(n, v) for n, v in _volumes("frontend").items() if "projected" in v]
    assert len(projected) == 1, projected
    vname, volume = projected[0]
    (source,) = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == topo.BROKER_SA_AUDIENCE
    assert token["expirationSeconds"] == k8s.TOKEN_EXPIRATION >= 600  # the API's minimum
    assert token["path"] == posixpath.basename(attestor.token_file)
    mounts = {
        cname: m
        for cname, c in _containers("frontend").items()
        for m in c.get("volumeMounts", [])
        if m["name"] == vname
    }
    assert set(mounts) == {"sidecar"}, "only the sidecar may read the token"
    assert mounts["sidecar"]["mountPath"] == posixpath.dirname(attestor.token_file)
    assert mounts["sidecar"]["readOnly"] is True

    broker = checks.load_broker_config(_config_file("broker"))
    (cluster,) = broker.clusters
    assert topo.BROKER_SA_AUDIENCE in cluster.audiences
    assert cluster.issuer == k8s.CLUSTER_ISSUER
    assert "RS256" in cluster.algorithms  # what Kubernetes signs with by default
    assert cluster.location.file == k8s.CLUSTER_JWKS_FILE
    selectors = k8s_selectors(
        namespace=topo.NAMESPACE, service_account=pod["serviceAccountName"], cluster=cluster.issuer
    )
    entry = broker.registry.match(selectors)
    assert entry is not None and entry.spiffe_id == topo.FRONTEND_ID
    assert entry.selectors == {f"k8s:ns:{topo.NAMESPACE}", f"k8s:sa:{topo.FRONTEND_SA}"}
    assert entry.allows_audience(topo.ORDERS_ID)
    assert broker.attestation_socket is None  # no unix attestation inside a cluster


def test_broker_pod_provides_the_cluster_keys_and_a_run_directory() -> None:
    broker = checks.load_broker_config(_config_file("broker"))
    mounts = {m["mountPath"]: m["name"] for m in _containers("broker")["broker"]["volumeMounts"]}
    volumes = _volumes("broker")
    jwks_dir = posixpath.dirname(k8s.CLUSTER_JWKS_FILE)
    jwks_volume = volumes[mounts[jwks_dir]]
    assert jwks_volume["configMap"]["name"] in EXTERNAL_CONFIGMAPS
    assert posixpath.basename(k8s.CLUSTER_JWKS_FILE) in EXTERNAL_CONFIGMAPS["cluster-jwks"]
    # The broker creates its run directory itself, inside a writable emptyDir (it refuses a
    # directory that others may write, which an emptyDir's root is).
    run_parent = posixpath.dirname(k8s.RUN_DIR)
    assert "emptyDir" in volumes[mounts[run_parent]]
    assert posixpath.dirname(broker.admin_socket) == k8s.RUN_DIR
    assert broker.revocation_state_file == f"{k8s.RUN_DIR}/revocations.json"


# -- services, ports and the URLs in the configs ---------------------------------------------


def _target_port(deployment: str, service: dict[str, Any]) -> tuple[str, int]:
    """(container, port number) a Service's only port leads to."""
    (port,) = service["spec"]["ports"]
    target = port["targetPort"]
    found = [
        (cname, p["containerPort"])
        for cname, c in _containers(deployment).items()
        for p in c.get("ports", [])
        if target in (p.get("name"), p["containerPort"])
    ]
    assert len(found) == 1, f"targetPort {target} of {service['metadata']['name']}: {found}"
    return found[0]


def test_services_expose_only_envoy_and_the_broker() -> None:
    exposed = {
        (d, c): [p["containerPort"] for p in spec.get("ports", [])]
        for d in ("broker", "orders", "frontend")
        for c, spec in _containers(d).items()
        if spec.get("ports")
    }
    assert exposed == {
        ("broker", "broker"): [P.port("broker", "http"), P.port("broker", "admin")],
        ("orders", "envoy"): [P.port("envoy", "ingress")],
        ("orders", "sidecar"): [P.port("orders-sidecar", "admin")],  # metrics, no Service
        ("frontend", "sidecar"): [P.port("frontend-sidecar", "admin")],
    }
    for name, (container, service_role) in {
        "orders": ("envoy", ("envoy", "ingress")),
        "broker": ("broker", ("broker", "http")),
    }.items():
        service = OBJECTS[("Service", name)]
        labels = OBJECTS[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), name
        assert _target_port(name, service) == (container, P.port(*service_role)), name
        (port,) = service["spec"]["ports"]
        assert port["port"] == P.port(*service_role), name
        assert (
            P.url(*service_role)
            == f"http://{name}.{topo.NAMESPACE}.svc.cluster.local:{port['port']}"
        )


def test_configs_parse_and_reference_each_other() -> None:
    broker = checks.load_broker_config(_config_file("broker"))
    issuer = P.url("broker", "http")
    assert broker.issuer == issuer
    assert broker.listen == ("0.0.0.0", P.port("broker", "http"))
    assert broker.admin_listen == ("0.0.0.0", P.port("broker", "admin"))

    envoy: dict[str, Any] = yaml.safe_load(_config_file("envoy").read_text())
    assert checks.envoy_listener(envoy) == ("0.0.0.0", P.port("envoy", "ingress"))
    endpoints = checks.envoy_endpoints(envoy)
    assert endpoints["app"] == ("127.0.0.1", P.port("orders", "http"))

    orders = checks.load_sidecar_config(_config_file("orders-sidecar"))
    assert orders.identity is None and orders.egress is None
    assert topo.ORDERS_ID in orders.authz.settings.audiences
    assert [s.location.issuer for s in orders.authz.sources] == [issuer]
    grpc_listen = orders.authz.grpc_listen
    assert grpc_listen is not None and not grpc_listen.is_unix
    assert endpoints["ext_authz"] == (grpc_listen.host, grpc_listen.port)
    assert grpc_listen.host == "127.0.0.1"
    assert orders.authz.policy.allowing_rule(topo.FRONTEND_ID, "GET", "/orders/1") is not None

    frontend = checks.load_sidecar_config(_config_file("frontend-sidecar"))
    assert frontend.identity.issuer == issuer
    (upstream,) = frontend.egress.upstreams
    assert upstream.target.origin == P.url("envoy", "ingress")
    assert orders.authz.settings.authorities == frozenset({upstream.target.origin})
    assert upstream.target.audience == topo.ORDERS_ID
    assert upstream.listen == ("127.0.0.1", P.port("frontend-sidecar", "egress"))
    assert frontend.admin[0] == "0.0.0.0"  # probes and scrapes; egress stays on loopback


@pytest.mark.integration
def test_envoy_bootstrap_passes_envoy_validate() -> None:
    result = validate_envoy_config(_config_file("envoy"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"envoy --mode validate failed:\n{output}"
    assert "OK" in output, output
    assert "deprecated" not in output.lower(), output
