"""Prometheus metrics of the broker, in its own registry. Label children are bound on first
use and kept: ``labels()`` costs a dict look-up and a lock per call."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

from sidecar.broker.codes import BrokerReason
from sidecar.observability.metrics import BoundLabels, function_gauge

# Issuance takes ~0.2 ms (cached subject token) to tens of ms (first hash of a binary).
ISSUANCE_BUCKETS = (
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
    0.3,  # the M2 objective: p95 under 300 ms
    0.5,
    1.0,
)
ATTESTORS = ("unix", "k8s")
#: Refusal reasons that are never tolerated (M6 replays, M8 revoked callers): their children
#: exist from the start so that the first one shows as an increase.
ALERTED_REFUSALS = (BrokerReason.REPLAYED, BrokerReason.REVOKED)


class BrokerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.issuance = Counter(
            "sidecar_broker_issuance",
            "Token requests by attestor and result ('issued' or the OAuth error code)",
            ["attestor", "result"],
            registry=registry,
        )
        self.latency = Histogram(
            "sidecar_broker_issuance_seconds",
            "Time to answer one token request, by attestor",
            ["attestor"],
            buckets=ISSUANCE_BUCKETS,
            registry=registry,
        )
        self.attestation_failures = Counter(
            "sidecar_broker_attestation_failures",
            "Callers that could not be attested or matched no entry, by attestor and reason",
            ["attestor", "reason"],
            registry=registry,
        )
        self.key_events = Counter(
            "sidecar_broker_key_events",
            "Signing key life-cycle events (published, activated, retired, removed)",
            ["event"],
            registry=registry,
        )
        self.revocations_total = Counter(
            "sidecar_broker_revocation_changes",
            "Revocations added or removed through the admin socket",
            ["kind", "action"],
            registry=registry,
        )
        self.revocation_requests = Counter(
            "sidecar_broker_revocation_list_requests",
            "Answers to GET /revocations by status and whether Prefer: wait was honoured",
            ["status", "long_poll"],
            registry=registry,
        )
        self.revocation_request = BoundLabels(self.revocation_requests)
        self.refusals = Counter(
            "sidecar_broker_refusals",
            "Token requests refused, by attestor and finer reason (a closed set of codes)",
            ["attestor", "reason"],
            registry=registry,
        )
        self.key_rotations = Counter(
            "sidecar_broker_key_rotations",
            "Scheduled signing-key generations, by outcome (ok|failed)",
            ["outcome"],
            registry=registry,
        )
        self.high_privilege_grants = Counter(
            "sidecar_broker_high_privilege_grants",
            "Tokens issued for an audience listed in tokens.high_privilege_audiences",
            ["audience"],
            registry=registry,
        )
        for attestor in ATTESTORS:
            for reason in ALERTED_REFUSALS:
                self.refusals.labels(attestor, reason)
        for outcome in ("ok", "failed"):
            self.key_rotations.labels(outcome)
        self._issuance = BoundLabels(self.issuance)
        self._latency = BoundLabels(self.latency)

    def gauge(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        function_gauge(self.registry, name, doc, fn)

    def record(self, attestor: str, result: str, seconds: float) -> None:
        self._issuance(attestor, result).inc()
        self._latency(attestor).observe(seconds)

    def watch_grants(self, audiences: Iterable[str]) -> None:
        """Expose the high-privilege audiences at zero before their first grant."""
        for audience in audiences:
            self.high_privilege_grants.labels(audience)

    def granted(self, audiences: Iterable[str], watched: frozenset[str]) -> None:
        for audience in audiences:
            if audience in watched:
                self.high_privilege_grants.labels(audience).inc()

    def refused(self, attestor: str, reason: BrokerReason) -> None:
        self.refusals.labels(attestor, reason).inc()

    def attestation_failed(self, attestor: str, reason: BrokerReason) -> None:
        self.attestation_failures.labels(attestor, reason).inc()
