"""Prometheus metrics of the egress proxy. Label children are bound once per label set
(``labels()`` takes a lock and a dict look-up: too much to pay per request).

* ``sidecar_egress_requests_total{upstream, status_class}`` — every request answered, by the
  status class the app saw (``2xx``…``5xx``), the proxy's own answers included.
* ``sidecar_egress_local_responses_total{upstream, reason}`` — answers the proxy gave itself
  (``no_valid_token``, ``upstream_unreachable``, ``upstream_timeout``, ...).
* ``sidecar_egress_added_latency_seconds{upstream}`` — time a request spends in the proxy
  outside the upstream exchange: from accepting it to sending it upstream (token look-up,
  proof, headers, small-body buffering), plus from the upstream's response headers to ours.
* ``sidecar_egress_upstream_seconds{upstream}`` — from sending upstream to its response head.
* ``sidecar_egress_nonce_retries_total{upstream, outcome}`` — nonce challenges: ``retried``,
  or ``not_replayable`` (the body was streamed; the 401 went back to the app).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from sidecar.observability.metrics import BoundLabels

ADDED_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)
UPSTREAM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class EgressMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "sidecar_egress_requests",
            "Requests through the egress proxy by upstream and status class",
            ["upstream", "status_class"],
            registry=registry,
        )
        self.local = Counter(
            "sidecar_egress_local_responses",
            "Answers the egress proxy gave itself, by upstream and reason",
            ["upstream", "reason"],
            registry=registry,
        )
        self.added = Histogram(
            "sidecar_egress_added_latency_seconds",
            "Time a request spends in the egress proxy outside the upstream exchange",
            ["upstream"],
            buckets=ADDED_BUCKETS,
            registry=registry,
        )
        self.upstream = Histogram(
            "sidecar_egress_upstream_seconds",
            "Time from sending a request upstream to its response headers",
            ["upstream"],
            buckets=UPSTREAM_BUCKETS,
            registry=registry,
        )
        self.nonce_retries = Counter(
            "sidecar_egress_nonce_retries",
            "DPoP nonce challenges from upstreams, by outcome (retried|not_replayable)",
            ["upstream", "outcome"],
            registry=registry,
        )
        self._requests = BoundLabels(self.requests)
        self._added = BoundLabels(self.added)
        self._upstream = BoundLabels(self.upstream)
        # (upstream, status) -> the three children a request updates: one look-up per request
        # (bounded: configured upstreams x three-digit statuses).
        self._by_status: dict[tuple[str, int], tuple[Counter, Histogram, Histogram]] = {}

    def request(self, upstream: str, status: int, added: float, upstream_time: float) -> None:
        children = self._by_status.get((upstream, status))
        if children is None:
            children = self._by_status[(upstream, status)] = (
                self._requests(upstream, f"{status // 100}xx"),
                self._added(upstream),
                self._upstream(upstream),
            )
        requests, added_seconds, upstream_seconds = children
        requests.inc()
        added_seconds.observe(added)
        if upstream_time >= 0:
            upstream_seconds.observe(upstream_time)

    def local_response(self, upstream: str, reason: str) -> None:
        self.local.labels(upstream, reason).inc()
