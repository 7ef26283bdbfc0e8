"""The configuration files of the docker-compose setup, rendered from the demo's topology.

    python -m sidecar.demo.compose --write   # rewrite deploy/compose/*.yaml
    python -m sidecar.demo.compose --check   # exit 1 if a committed file differs

``docker-compose.yml`` (repository root) runs the demo's services as containers grouped in
pods (:data:`sidecar.demo.topology.PODS`): each pod's legacy app owns a network namespace that
its sidecar (and, for orders, Envoy) joins with ``network_mode: service:<app>``, so everything
but the broker's HTTP port and Envoy's ingress is reachable on 127.0.0.1 inside the pod only.

Both callers are attested by the broker over its Unix socket, shared through the
:data:`RUN_VOLUME` volume: their sidecars run as distinct uids (:data:`CALLER_UIDS`) and the
broker's entries select on ``unix:uid:…``. SO_PEERCRED gives the broker a pid of 0 for a peer
in another pid namespace, and the broker refuses a peer without a pid (it cannot rule out a
reused pid); the caller sidecars therefore join the broker's pid namespace (``pid:
service:broker``). Their executables are not readable by the broker (another uid), so
``unix:path``/``unix:sha256`` selectors are not available in compose: the uid is the identity.

The ``observability`` profile (``docker compose --profile observability up``) adds
Prometheus with the rules of deploy/observability/ and Grafana with its dashboard. The admin
listeners stay pod-local: one Prometheus agent per pod joins the pod's network namespace,
scrapes 127.0.0.1 and remote-writes to the central Prometheus (:data:`PROMETHEUS_URL`).

tests/integration/test_compose.py checks docker-compose.yml and these files against the topology.
"""

from __future__ import annotations

import sys
from typing import Any

from sidecar.demo import generated
from sidecar.demo import topology as topo
from sidecar.envoy_config import dump_yaml

COMMAND = "python -m sidecar.demo.compose --write"
#: The compose file, relative to the repository root; bind-mount sources are relative to it.
COMPOSE_FILE = "docker-compose.yml"
#: Where the rendered files are committed, relative to the repository root.
OUT_DIR = "deploy/compose"
#: The named volume holding the broker's run directory (attestation socket).
RUN_VOLUME = "broker-run"
#: Its mount point in every container that mounts it (the Dockerfile creates it, owned by the
#: image's user, so a fresh volume takes that owner: the broker refuses a directory it does not
#: own, or that others may write).
RUN_DIR = "/run/sidecar-broker"
#: Where each container finds its configuration file (bind-mounted read-only).
CONFIG_DIR = "/etc/sidecar"
TOKEN_TTL = 300
#: The uid (and gid) each caller's sidecar runs as: the broker's selector for its identity.
CALLER_UIDS: dict[str, int] = {"frontend-sidecar": 1001, "reports-sidecar": 1002}
CALLER_IDS: dict[str, str] = {
    "frontend-sidecar": topo.FRONTEND_ID,
    "reports-sidecar": topo.REPORTS_ID,
}
#: The services with an admin listener whose /metrics the observability profile collects.
SCRAPED = ("broker", "orders-sidecar", "frontend-sidecar", "reports-sidecar")
#: Where the pods' agents send what they scrape (the central Prometheus's receiver).
PROMETHEUS_URL = "http://prometheus:9090/api/v1/write"
#: Where the central Prometheus finds the rule files (bind-mounted read-only).
RULES_DIR = "/etc/prometheus/rules"
RULE_FILES = ("recording.rules.yml", "alerts.rules.yml")
#: Rendered file → the service that mounts it.
FILES: dict[str, str] = {
    "broker.yaml": "broker",
    "orders-sidecar.yaml": "orders-sidecar",
    "frontend-sidecar.yaml": "frontend-sidecar",
    "reports-sidecar.yaml": "reports-sidecar",
    "envoy.yaml": "envoy",
    "prometheus.yaml": "prometheus",
    **{f"metrics-{pod}.yaml": f"metrics-{pod}" for pod in topo.PODS},
}


def placement() -> topo.Placement:
    """Pods reached by their app's service name (the owner of the pod's network namespace;
    the broker is a pod of its own)."""
    return topo.pod_placement({pod: pod for pod in topo.PODS})


def configs(p: topo.Placement | None = None) -> dict[str, dict[str, Any]]:
    """Rendered file name → configuration (plain data)."""
    p = p or placement()
    return {
        "broker.yaml": topo.broker_config(
            p,
            run_dir=RUN_DIR,
            cluster_jwks_file=None,  # no cluster in compose: both callers are unix-attested
            unix_selectors={CALLER_IDS[s]: [f"unix:uid:{uid}"] for s, uid in CALLER_UIDS.items()},
            token_ttl=TOKEN_TTL,
        ),
        "orders-sidecar.yaml": topo.orders_sidecar_config(p),
        **{
            f"{service}.yaml": topo.caller_sidecar_config(p, service, topo.unix_attestor(RUN_DIR))
            for service in CALLER_UIDS
        },
        "envoy.yaml": topo.envoy_bootstrap(p),
        "prometheus.yaml": {
            "global": {"evaluation_interval": "1m"},
            "rule_files": [f"{RULES_DIR}/{name}" for name in RULE_FILES],
        },
        **{f"metrics-{pod}.yaml": agent_config(p, pod) for pod in topo.PODS},
    }


def agent_config(p: topo.Placement, pod: str) -> dict[str, Any]:
    """A Prometheus agent in ``pod``'s network namespace: the pod's admin listeners by
    loopback, one job per service (the rules aggregate by ``job``)."""
    return {
        "global": {"scrape_interval": "15s"},
        "scrape_configs": [
            {
                "job_name": service,
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{p.port(service, 'admin')}"],
                        "labels": {"pod": pod},
                    }
                ],
            }
            for service in SCRAPED
            if topo.pod_of(service) == pod
        ],
        "remote_write": [{"url": PROMETHEUS_URL}],
    }


def render_all() -> dict[str, str]:
    """Rendered file name → full text (header included)."""
    out: dict[str, str] = {}
    for name, data in configs().items():
        note = f"Mounted by {COMPOSE_FILE} into service {FILES[name]!r}."
        body = dump_yaml(data) if name == "envoy.yaml" else generated.dump(data)
        out[name] = generated.header(COMMAND, note) + body
    return out


def main(argv: list[str] | None = None) -> int:
    return generated.main(
        argv,
        description="Render deploy/compose/*.yaml from sidecar/demo/topology.py",
        render=render_all,
        default_dir=generated.REPO_ROOT / OUT_DIR,
        command=COMMAND,
    )


if __name__ == "__main__":
    sys.exit(main())
