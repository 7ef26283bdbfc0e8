"""The Grafana dashboard: the checked-in JSON is what the generator renders, it has the three
rows the on-call rotation expects, and every query names only series that exist (a metric the
package registers or a recording rule)."""

from __future__ import annotations

import json

from observability_names import OBSERVABILITY, exposed_series, recorded_names, series_in

from sidecar.observability.dashboards import render

DASHBOARDS = OBSERVABILITY / "grafana" / "dashboards"
REGENERATE = "python -m sidecar.observability.dashboards --write"


def test_checked_in_dashboards_match_the_generator() -> None:
    rendered = render()
    on_disk = {p.name for p in DASHBOARDS.glob("*.json")}
    assert on_disk == set(rendered), (
        "regenerate: python -m sidecar.observability.dashboards --write"
    )
    for name, text in rendered.items():
        assert (DASHBOARDS / name).read_text() == text, f"{name} differs: {REGENERATE}"


def _panels() -> list[dict[str, object]]:
    return [p for text in render().values() for p in json.loads(text)["panels"]]


def test_rows_and_unique_panel_ids() -> None:
    panels = _panels()
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Overview: SLOs and error budget", "On call", "Debug"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))


def test_every_query_names_only_existing_series() -> None:
    known = exposed_series() | recorded_names()
    unknown = set()
    queries = 0
    for panel in _panels():
        for target in panel.get("targets") or []:  # type: ignore[attr-defined]
            queries += 1
            unknown |= {(panel["title"], n) for n in series_in(target["expr"]) if n not in known}
    assert queries > 20
    assert not unknown, f"dashboard queries name series nobody exposes or records: {unknown}"
