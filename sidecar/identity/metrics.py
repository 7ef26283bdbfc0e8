"""Prometheus metrics of the token source.

* ``sidecar_identity_token_fetches_total{audience, trigger, result}`` — every fetch; ``trigger``
  is ``refresh`` (background) or ``demand`` (a request found no usable token); ``result`` is
  ``ok`` or the error code.
* ``sidecar_identity_refresh_failures_total{audience, code}`` — failed fetches.
* ``sidecar_identity_token_expiry_seconds{audience}`` — seconds until the cached token expires
  (negative once expired; absent before the first token). Computed at scrape time.
* ``sidecar_identity_token_usable{audience}`` — 1 if a token may be sent now, else 0.
* ``sidecar_clock_offset_seconds{peer}`` — the correction DPoP proofs to a peer carry (its
  clock minus ours, from the ``Date`` of its answers; absent until one was learned).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _ExpiryCollector(Collector):
    def __init__(self, snapshot: Callable[[], list[tuple[str, float | None, bool]]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        expiry = GaugeMetricFamily(
            "sidecar_identity_token_expiry_seconds",
            "Seconds until the cached token for an audience expires (negative: expired)",
            labels=["audience"],
        )
        usable = GaugeMetricFamily(
            "sidecar_identity_token_usable",
            "1 if a token for the audience may be sent now, else 0",
            labels=["audience"],
        )
        for audience, seconds, ok in self._snapshot():
            if seconds is not None:
                expiry.add_metric([audience], seconds)
            usable.add_metric([audience], 1.0 if ok else 0.0)
        yield expiry
        yield usable


class _ClockOffsetCollector(Collector):
    def __init__(self, snapshot: Callable[[], list[tuple[str, float]]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        family = GaugeMetricFamily(
            "sidecar_clock_offset_seconds",
            "A peer's clock minus ours, as learned from its Date; DPoP proofs to it add this",
            labels=["peer"],
        )
        for peer, offset in self._snapshot():
            family.add_metric([peer], offset)
        yield family


class IdentityMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.fetches = Counter(
            "sidecar_identity_token_fetches",
            "Token fetches by audience, trigger (refresh|demand) and result (ok|error code)",
            ["audience", "trigger", "result"],
            registry=registry,
        )
        self.failures = Counter(
            "sidecar_identity_refresh_failures",
            "Failed token fetches by audience and error code",
            ["audience", "code"],
            registry=registry,
        )

    def watch_expiry(self, snapshot: Callable[[], list[tuple[str, float | None, bool]]]) -> None:
        self.registry.register(_ExpiryCollector(snapshot))

    def watch_clock_offsets(self, snapshot: Callable[[], list[tuple[str, float]]]) -> None:
        self.registry.register(_ClockOffsetCollector(snapshot))

    def fetched(self, audience: str, trigger: str, result: str) -> None:
        self.fetches.labels(audience, trigger, result).inc()
        if result != "ok":
            self.failures.labels(audience, result).inc()
