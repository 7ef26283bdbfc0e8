"""The demo's topology as data: who runs, on which port, with which configuration.

One description serves several renderings: ``sidecar demo`` (local processes on 127.0.0.1, ports
picked at start), the docker-compose files under ``deploy/compose/`` and the Kubernetes example
under ``deploy/kubernetes/`` (both :func:`pod_placement`: fixed ports, pods reached by name;
``sidecar.demo.compose`` and ``sidecar.demo.kubernetes`` render them). Keeping the configs
here, built from one function per component, is what makes "the compose file has the demo's
topology" checkable by a test instead of a promise.

    legacy frontend ──► frontend's sidecar (egress, k8s attestor) ──► Envoy ──► orders (app)
    legacy reports  ──► reports' sidecar  (egress, unix attestor) ──┘    │
                                                      orders' sidecar ◄──┘ ext_authz (gRPC)
    broker: issuer/STS; verifies the cluster's service-account tokens and unix peer credentials

Reports' sidecar has a second egress listener, to orders' WIMSE route (``/reports``): a WIT
from the broker and a fresh WPT per request instead of an access token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TRUST_DOMAIN = "demo.local"
ORDERS_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/orders"
FRONTEND_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend"
REPORTS_ID = f"spiffe://{TRUST_DOMAIN}/host/reports"
CLUSTER_ISSUER = "https://kubernetes.demo.local"
#: The audience the simulated kubelet puts in projected service-account tokens for the broker.
BROKER_SA_AUDIENCE = "sidecar-broker"
NAMESPACE = "shop"
FRONTEND_SA = "frontend"
#: Demo-only secret for stateless DPoP nonces (a real deployment sets its own).
DEMO_NONCE_SECRET = "demo-nonce-secret-not-for-production-0123"

#: Service name → {port role → default port}. The compose file publishes exactly these.
DEFAULT_PORTS: dict[str, dict[str, int]] = {
    "broker": {"http": 8443, "admin": 15021},
    "orders": {"http": 8080},
    "envoy": {"ingress": 10000, "admin": 9901},
    "orders-sidecar": {"grpc": 9191, "admin": 15020},
    "frontend-sidecar": {"egress": 15001, "admin": 15120},
    # wimse: a second egress listener, to orders' WIMSE route (a WIT + a WPT per request)
    "reports-sidecar": {"egress": 15002, "wimse": 15003, "admin": 15220},
}

#: Paths of the walkthrough, and the policy that orders' sidecar enforces on them.
ORDERS_PREFIX = "/orders"
CHECKOUT_PREFIX = "/checkout"  # a nonce-protected route (RFC 9449 §8 server nonce)
#: A route callers reach with a WIMSE WIT + WPT (draft-ietf-wimse-workload-creds, -wpt).
REPORTS_PREFIX = "/reports"
#: The WPTs reports' sidecar signs live this long; orders accepts no longer (a WPT has no
#: iat: after a restart its replay guard refuses WPTs for max_proof_lifetime - this).
WPT_LIFETIME = 30


@dataclass(frozen=True)
class Placement:
    """Where every service listens and how the others reach it."""

    ports: dict[str, dict[str, int]] = field(default_factory=lambda: _copy(DEFAULT_PORTS))
    #: service → host name others use to reach it ("127.0.0.1" locally, the service in compose)
    hosts: dict[str, str] = field(default_factory=dict)
    #: listeners (service, role) that other hosts or pods reach: they bind all interfaces;
    #: every other listener binds 127.0.0.1 (see :func:`pod_placement`)
    exposed: frozenset[tuple[str, str]] = frozenset()

    def host(self, service: str) -> str:
        return self.hosts.get(service, "127.0.0.1")

    def port(self, service: str, role: str) -> int:
        return self.ports[service][role]

    def bind_address(self, service: str, role: str) -> str:
        return "0.0.0.0" if (service, role) in self.exposed else "127.0.0.1"

    def listen(self, service: str, role: str) -> str:
        return f"{self.bind_address(service, role)}:{self.port(service, role)}"

    def url(self, service: str, role: str) -> str:
        return f"http://{self.host(service)}:{self.port(service, role)}"


def _copy(ports: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {name: dict(roles) for name, roles in ports.items()}


#: Pods: the services that share one network namespace (a Kubernetes pod; ``network_mode:
#: service:…`` in compose), each pod with its legacy app. Inside a pod they talk over
#: 127.0.0.1. "frontend" and "reports" are the legacy clients (``sidecar.apps.legacy_client``).
PODS: dict[str, tuple[str, ...]] = {
    "broker": ("broker",),
    "orders": ("orders", "orders-sidecar", "envoy"),
    "frontend": ("frontend", "frontend-sidecar"),
    "reports": ("reports", "reports-sidecar"),
}
#: The listeners other pods connect to: in pods, the only ones bound to all interfaces.
EXPOSED: frozenset[tuple[str, str]] = frozenset({("broker", "http"), ("envoy", "ingress")})
#: The legacy client of each caller pod → its sidecar.
LEGACY_CLIENTS: dict[str, str] = {"frontend": "frontend-sidecar", "reports": "reports-sidecar"}


def pod_of(service: str) -> str:
    return next(pod for pod, members in PODS.items() if service in members)


def pod_placement(pod_hosts: dict[str, str]) -> Placement:
    """Services grouped in :data:`PODS`; pod ``x`` is reached at ``pod_hosts[x]`` (a compose
    service, a cluster DNS name).

    Only :data:`EXPOSED` listeners bind all interfaces; everything else binds 127.0.0.1 and
    is reached only from inside its pod. That is the point: an egress listener other pods
    could reach would lend them its workload's identity, and an app reachable directly would
    let callers skip Envoy and its ext_authz.
    """
    hosts = {service: pod_hosts[pod_of(service)] for service, _ in EXPOSED}
    return Placement(hosts=hosts, exposed=EXPOSED)


def issuer(p: Placement) -> str:
    return p.url("broker", "http")


def broker_config(
    p: Placement,
    *,
    run_dir: str,
    cluster_jwks_file: str | None,
    unix_selectors: dict[str, list[str]],
    token_ttl: int,
    audit_path: str | None = None,
) -> dict[str, Any]:
    """The broker: one cluster (the demo kubelet's signing key) and the registration entries.

    ``unix_selectors`` maps a SPIFFE ID to the peer-credential selectors that identify it;
    ``cluster_jwks_file`` None leaves Kubernetes exchange out (compose uses unix only).
    """
    entries: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    if cluster_jwks_file is not None:
        clusters.append(
            {
                "issuer": CLUSTER_ISSUER,
                "jwks_file": cluster_jwks_file,
                "audiences": [BROKER_SA_AUDIENCE],
                "algorithms": ["ES256"],
            }
        )
        entries.append(
            {
                "spiffe_id": FRONTEND_ID,
                "selectors": [f"k8s:ns:{NAMESPACE}", f"k8s:sa:{FRONTEND_SA}"],
                "audiences": [ORDERS_ID],
                "ttl": token_ttl,
            }
        )
    for spiffe_id, selectors in unix_selectors.items():
        entries.append(
            {
                "spiffe_id": spiffe_id,
                "selectors": selectors,
                "audiences": [ORDERS_ID],
                "ttl": token_ttl,
            }
        )
    config: dict[str, Any] = {
        "issuer": issuer(p),
        "listen": p.listen("broker", "http"),
        "tokens": {"ttl": token_ttl},
        "attestation": {"socket": f"{run_dir}/attestation.sock"},
        "admin": {"listen": p.listen("broker", "admin"), "socket": f"{run_dir}/admin.sock"},
        "revocation": {"state_file": f"{run_dir}/revocations.json"},
        "clusters": clusters,
        "entries": entries,
    }
    if audit_path is not None:
        config["audit"] = {"path": audit_path}
    return config


def orders_sidecar_config(p: Placement, *, also_reached_at: tuple[str, ...] = ()) -> dict[str, Any]:
    """Orders' sidecar: ext_authz only (its app makes no outbound calls).

    Its ``authorities`` are the origin callers use to reach orders (Envoy's ingress), plus
    ``also_reached_at`` (the demo's wire tap, which forwards the Host it was given)."""
    return {
        "authz": {
            "audience": ORDERS_ID,
            "authorities": [p.url("envoy", "ingress"), *also_reached_at],
            "issuers": [{"issuer": issuer(p), "discovery": True, "algorithms": ["ES256"]}],
            "grpc": {"listen": p.listen("orders-sidecar", "grpc")},
            "http": {"enabled": False},
            "nonce": {"secret": DEMO_NONCE_SECRET},
            "revocation": {"url": f"{issuer(p)}/revocations", "interval": 1},
            # WIT keys: the broker's SPIFFE bundle (keys with use: wit-svid). Plain http like
            # every demo URL; a deployment serves the broker over https.
            "trust_domains": [
                {
                    "name": TRUST_DOMAIN,
                    "bundle_endpoint": f"{issuer(p)}/bundle",
                    "insecure_http": True,
                }
            ],
            "wimse": {"max_proof_lifetime": WPT_LIFETIME},
            "routes": [
                {"prefix": CHECKOUT_PREFIX, "auth": "dpop", "nonce": True},
                {"prefix": REPORTS_PREFIX, "auth": "wimse"},
            ],
            "rules": [
                {
                    "name": "frontend-uses-orders",
                    "principals": [FRONTEND_ID],
                    "methods": ["GET", "POST"],
                    "paths": [ORDERS_PREFIX, CHECKOUT_PREFIX],
                },
                {
                    "name": "reports-reads-reports",
                    "principals": [REPORTS_ID],
                    "methods": ["GET"],
                    "paths": [REPORTS_PREFIX],
                },
            ],
        },
        "admin": {"listen": p.listen("orders-sidecar", "admin")},
    }


def caller_sidecar_config(
    p: Placement,
    service: str,
    attestor: dict[str, Any],
    *,
    upstream: str | None = None,
    wimse_upstream: str | None = None,
) -> dict[str, Any]:
    """A caller's sidecar: identity from ``attestor``, one egress listener to orders' Envoy
    with an access token, and, when the service has a ``wimse`` port, one with a WIT + WPT.

    ``upstream`` and ``wimse_upstream`` override where they go (the demo puts a wire tap in
    between).
    """
    upstreams: list[dict[str, Any]] = [
        {
            "name": "orders",
            "listen": p.listen(service, "egress"),
            "upstream": upstream or p.url("envoy", "ingress"),
            "audience": ORDERS_ID,
        }
    ]
    if "wimse" in p.ports[service]:
        upstreams.append(
            {
                "name": "orders-wimse",
                "listen": p.listen(service, "wimse"),
                "upstream": wimse_upstream or p.url("envoy", "ingress"),
                "auth": "wimse",
                "wimse": {"proof_lifetime": WPT_LIFETIME},
            }
        )
    return {
        "identity": {
            "issuer": issuer(p),
            "attestor": attestor,
            "audiences": [ORDERS_ID],
            "refresh": {"backoff_initial": 0.2, "backoff_max": 5, "demand_interval": 0.5},
        },
        "egress": {"upstreams": upstreams},
        "admin": {"listen": p.listen(service, "admin")},
    }


def unix_attestor(run_dir: str) -> dict[str, Any]:
    return {"type": "unix", "socket": f"{run_dir}/attestation.sock"}


def k8s_attestor(token_file: str) -> dict[str, Any]:
    return {"type": "k8s", "token_file": token_file}


def envoy_bootstrap(p: Placement) -> dict[str, Any]:
    """Envoy in front of orders, asking orders' sidecar over gRPC ext_authz."""
    from sidecar.envoy_config import ingress_bootstrap

    return ingress_bootstrap(
        listen_port=p.port("envoy", "ingress"),
        upstream_port=p.port("orders", "http"),
        admin_port=p.port("envoy", "admin"),
        mode="grpc",
        authz_port=p.port("orders-sidecar", "grpc"),
        listen_host=p.bind_address("envoy", "ingress"),
        upstream_host=p.host("orders"),
        authz_host=p.host("orders-sidecar"),
    )
