"""The configuration files of the Kubernetes example, rendered from the demo's topology.

    python -m sidecar.demo.kubernetes --write   # rewrite deploy/kubernetes/config/*.yaml
    python -m sidecar.demo.kubernetes --check   # exit 1 if a committed file differs

``deploy/kubernetes/kustomization.yaml`` turns each file into a ConfigMap
(``kubectl apply -k deploy/kubernetes``). Pods are the topology's :data:`PODS` (broker,
orders, frontend; "reports" is a host workload, attested over a Unix socket, so it has no
place in a cluster): within a pod the containers talk over 127.0.0.1, and only the broker's
HTTP port and Envoy's ingress are reachable through Services.

The frontend's sidecar is attested with the k8s attestor: it exchanges a projected
service-account token (audience :data:`sidecar.demo.topology.BROKER_SA_AUDIENCE`) at the
broker, which verifies it against the cluster's service-account issuer (:data:`CLUSTER_ISSUER`,
keys from the ``cluster-jwks`` ConfigMap) and maps ``k8s:ns:shop`` + ``k8s:sa:frontend`` to
the frontend's SPIFFE ID. tests/integration/test_kubernetes_example.py checks the manifests
against these files and the topology.
"""

from __future__ import annotations

import dataclasses
import posixpath
import sys
from typing import Any

from sidecar.demo import generated
from sidecar.demo import topology as topo
from sidecar.envoy_config import dump_yaml
from sidecar.identity.config import DEFAULT_K8S_TOKEN_FILE

COMMAND = "python -m sidecar.demo.kubernetes --write"
#: The example's folder and where the rendered files go, relative to the repository root.
EXAMPLE_DIR = "deploy/kubernetes"
OUT_DIR = f"{EXAMPLE_DIR}/config"
#: The service-account issuer of a kubeadm/kind cluster (``--service-account-issuer``). Yours:
#: ``kubectl get --raw /.well-known/openid-configuration`` (the ``issuer`` field).
CLUSTER_ISSUER = "https://kubernetes.default.svc.cluster.local"
#: Kubernetes signs service-account tokens with RS256 unless configured otherwise.
CLUSTER_ALGORITHMS = ["RS256", "ES256"]
#: The cluster's JWKS inside the broker's pod (ConfigMap ``cluster-jwks``, key ``jwks.json``).
CLUSTER_JWKS_FILE = "/etc/cluster-jwks/jwks.json"
#: The broker's run directory: a directory the broker creates itself inside an emptyDir (an
#: emptyDir is world-writable, and the broker refuses a directory others may write).
RUN_DIR = "/run/sidecar-broker/run"
#: The projected service-account token, in the frontend's sidecar container only.
TOKEN_FILE = DEFAULT_K8S_TOKEN_FILE
TOKEN_DIR = posixpath.dirname(TOKEN_FILE)
#: 600 s is the shortest lifetime the API server issues; the kubelet rotates the file at 80%.
TOKEN_EXPIRATION = 600
TOKEN_TTL = 300
#: Rendered file → the container that uses it.
FILES: dict[str, str] = {
    "broker.yaml": "broker",
    "orders-sidecar.yaml": "orders-sidecar",
    "frontend-sidecar.yaml": "frontend-sidecar",
    "envoy.yaml": "envoy",
}


def service_host(pod: str) -> str:
    """The cluster DNS name of the Service in front of ``pod``."""
    return f"{pod}.{topo.NAMESPACE}.svc.cluster.local"


#: Admin listeners on the pod IP: the kubelet's HTTP probes and Prometheus reach them there.
#: They only read (``/healthz``, ``/readyz``, ``/metrics``; the sidecars' ``/tokens`` shows
#: claims, never a token, and only to the pod itself); the broker's revocation API is on its
#: unix admin socket. Envoy's admin can drain and stop Envoy: it stays on loopback.
SCRAPED: frozenset[tuple[str, str]] = frozenset(
    {("broker", "admin"), ("orders-sidecar", "admin"), ("frontend-sidecar", "admin")}
)


def placement() -> topo.Placement:
    p = topo.pod_placement({pod: service_host(pod) for pod in ("broker", "orders")})
    return dataclasses.replace(p, exposed=p.exposed | SCRAPED)


def broker_config(p: topo.Placement) -> dict[str, Any]:
    """The demo's broker, pointed at a real cluster: its issuer and algorithms replace the
    simulated kubelet's, and there is no Unix attestation (pods prove who they are with their
    service-account token; a socket in the broker's pod would only ever see the broker)."""
    config = topo.broker_config(
        p,
        run_dir=RUN_DIR,
        cluster_jwks_file=CLUSTER_JWKS_FILE,
        unix_selectors={},
        token_ttl=TOKEN_TTL,
    )
    (cluster,) = config["clusters"]
    cluster["issuer"] = CLUSTER_ISSUER
    cluster["algorithms"] = list(CLUSTER_ALGORITHMS)
    config["attestation"] = {"enabled": False}
    return config


def configs(p: topo.Placement | None = None) -> dict[str, dict[str, Any]]:
    """Rendered file name → configuration (plain data)."""
    p = p or placement()
    return {
        "broker.yaml": broker_config(p),
        "orders-sidecar.yaml": topo.orders_sidecar_config(p),
        "frontend-sidecar.yaml": topo.caller_sidecar_config(
            p, "frontend-sidecar", topo.k8s_attestor(TOKEN_FILE)
        ),
        "envoy.yaml": topo.envoy_bootstrap(p),
    }


_NOTES: dict[str, tuple[str, ...]] = {
    "broker.yaml": (
        "clusters[0].issuer must be YOUR cluster's service-account issuer:",
        '  kubectl get --raw /.well-known/openid-configuration    # the "issuer" field',
        "and the broker reads the cluster's keys from the cluster-jwks ConfigMap:",
        "  kubectl get --raw /openid/v1/jwks > jwks.json",
        "  kubectl -n shop create configmap cluster-jwks --from-file=jwks.json",
    ),
}


def render_all() -> dict[str, str]:
    """Rendered file name → full text (header included)."""
    out: dict[str, str] = {}
    for name, data in configs().items():
        notes = (
            f"A ConfigMap via {EXAMPLE_DIR}/kustomization.yaml, for {FILES[name]!r}.",
            *_NOTES.get(name, ()),
        )
        body = dump_yaml(data) if name == "envoy.yaml" else generated.dump(data)
        out[name] = generated.header(COMMAND, *notes) + body
    return out


def main(argv: list[str] | None = None) -> int:
    return generated.main(
        argv,
        description="Render deploy/kubernetes/config/*.yaml from sidecar/demo/topology.py",
        render=render_all,
        default_dir=generated.REPO_ROOT / OUT_DIR,
        command=COMMAND,
    )


if __name__ == "__main__":
    sys.exit(main())
