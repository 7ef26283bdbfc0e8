"""Prometheus metrics for the authorizer, and the two helpers every component's metrics use.
One registry per process (tests build their own)."""

from __future__ import annotations

import importlib.metadata
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics import MetricWrapperBase

from sidecar.authz.decision import Decision
from sidecar.errors import Reason
from sidecar.observability.check_tally import CheckTally, TallyCounter, TallyHistogram
from sidecar.tls_rotation import TLSFilesCollector

M = TypeVar("M", bound=MetricWrapperBase)


class BoundLabels(Generic[M]):
    """A labelled metric's children, each bound once: ``labels()`` takes a lock and a dict
    look-up, too much to pay on every request."""

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


def build_version() -> str:
    """This package's version as installed (``pyproject.toml``), or ``unknown``."""
    try:
        return importlib.metadata.version("workload-identity-sidecar")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare tree
        return "unknown"


_PROCESS_METRICS: weakref.WeakSet[CollectorRegistry] = weakref.WeakSet()


def process_metrics(registry: CollectorRegistry) -> None:
    """The process's own series on its ``/metrics``: prometheus_client's ``process_*`` (CPU,
    memory, open and max fds, start time) and ``python_info``, and
    ``sidecar_build_info{version}``, and the TLS files in use (expiry, stale). Once per
    registry."""
    if registry in _PROCESS_METRICS:
        return
    _PROCESS_METRICS.add(registry)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(TLSFilesCollector())
    info = Gauge(
        "sidecar_build_info",
        "Always 1; the version of the sidecar package this process runs",
        ["version"],
        registry=registry,
    )
    info.labels(build_version()).set(1)


def function_gauge(
    registry: CollectorRegistry, name: str, doc: str, fn: Callable[[], float]
) -> None:
    """A gauge read from ``fn`` at scrape time (cache sizes, key counts)."""
    Gauge(name, doc, registry=registry).set_function(fn)


# Check latency lives between ~50 µs (cached token, bearer) and the 200 ms Envoy deadline.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
)


# Revocation propagation: ~ms with long-poll on one host, up to the poll interval without.
PROPAGATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TRANSPORTS = ("grpc", "http")
#: Deny reasons that page on their first occurrence (M6 replays, M8 credential-leak
#: indicators, a replay store that is down): their children exist from the start so that the
#: first one shows as an increase.
ALERTED_REASONS = (
    Reason.REPLAYED,
    Reason.PROOF_KEY_MISMATCH,
    Reason.ATH_MISMATCH,
    Reason.REVOKED,
    Reason.REPLAY_STORE_UNAVAILABLE,
)


class AuthzMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # sidecar_authz_decisions_total and sidecar_authz_check_seconds: written per check.
        self.checks = CheckTally(
            registry,
            TallyCounter(
                "sidecar_authz_decisions",
                "ext_authz decisions by transport, result and reason",
                ("transport", "result", "reason"),
            ),
            TallyHistogram(
                "sidecar_authz_check_seconds",
                "Time to decide one ext_authz check, by transport",
                ("transport",),
                LATENCY_BUCKETS,
            ),
        )
        self.replay_hits = Counter(
            "sidecar_authz_replay_hits", "DPoP proofs refused as replays", registry=registry
        )
        self.jwks_refreshes = Counter(
            "sidecar_jwks_refreshes",
            "JWKS refreshes by trigger and outcome",
            ["trigger", "outcome"],
            registry=registry,
        )
        self.revocation_propagation = Histogram(
            "sidecar_authz_revocation_propagation_seconds",
            "From a change of the revocation list at its issuer to its use here",
            buckets=PROPAGATION_BUCKETS,
            registry=registry,
        )
        self.policy_denies = Counter(
            "sidecar_authz_policy_denies",
            "Checks denied by the policy, by route (a configured authz.routes prefix, or /)",
            ["route"],
            registry=registry,
        )
        for transport in TRANSPORTS:
            for reason in ALERTED_REASONS:
                self.checks.touch((transport, "deny", reason.value))

    def cache_gauge(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        function_gauge(self.registry, name, doc, fn)

    def jwks_refreshed(self, trigger: str, outcome: str) -> None:
        self.jwks_refreshes.labels(trigger, outcome).inc()

    def record(self, transport: str, decision: Decision, seconds: float) -> None:
        reason = decision.reason
        if reason is None:
            self.checks.record((transport, "allow", ""), seconds)
            return
        self.checks.record((transport, "deny", reason.value), seconds)
        if reason is Reason.POLICY_DENIED:
            self.policy_denies.labels(decision.metadata.get("route", "/")).inc()
        elif reason is Reason.REPLAYED:
            self.replay_hits.inc()
