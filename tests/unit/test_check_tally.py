"""The per-check tally renders what prometheus_client's own Counter and Histogram would."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.observability.check_tally import CheckTally, TallyCounter, TallyHistogram
from sidecar.observability.metrics import LATENCY_BUCKETS

COUNTER = TallyCounter("t_decisions", "decisions", ("transport", "result", "reason"))
HISTOGRAM = TallyHistogram("t_check_seconds", "latency", ("transport",), LATENCY_BUCKETS)

keys = st.tuples(
    st.sampled_from(["grpc", "http"]),
    st.sampled_from(["allow", "deny"]),
    st.sampled_from(["", "replayed", "expired"]),
)
# Bounds exactly, between them, below the first and above the last.
seconds = st.sampled_from(LATENCY_BUCKETS) | st.floats(0, 1.0, allow_nan=False)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if not s.name.endswith("_created"):  # a timestamp: differs by construction
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(keys, seconds), max_size=40), st.lists(keys, max_size=3))
def test_same_series_as_prometheus_client(
    observations: list[tuple[tuple[str, str, str], float]], touched: list[tuple[str, str, str]]
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    tally = CheckTally(ours, COUNTER, HISTOGRAM)
    counter = Counter(COUNTER.name, COUNTER.doc, COUNTER.labels, registry=theirs)
    histogram = Histogram(
        HISTOGRAM.name, HISTOGRAM.doc, HISTOGRAM.labels, buckets=LATENCY_BUCKETS, registry=theirs
    )
    for key in touched:
        tally.touch(key)
        counter.labels(*key)
    for key, value in observations:
        tally.record(key, value)
        counter.labels(*key).inc()
        histogram.labels(key[0]).observe(value)
    assert samples(ours) == samples(theirs)
    created = {
        s.labels["transport"]
        for family in text_string_to_metric_families(generate_latest(ours).decode())
        for s in family.samples
        if s.name == "t_check_seconds_created"
    }
    assert created == {key[0] for key, _ in observations}


def test_concurrent_records_are_all_counted() -> None:
    tally = CheckTally(CollectorRegistry(), COUNTER, HISTOGRAM)
    key = ("grpc", "allow", "")

    def work() -> None:
        for _ in range(20_000):
            tally.record(key, 0.0001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tally.value(key) == 80_000
