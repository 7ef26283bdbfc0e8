"""The recording and alerting rules in deploy/observability: promtool accepts them, its unit
tests prove every alert fires on a failure series and stays quiet on a healthy one, every
expression names only series that exist, and every alert names a runbook section that does."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from observability_names import (
    OBSERVABILITY,
    RULE_FILES,
    alerts,
    exposed_series,
    recorded_names,
    rule_groups,
    series_in,
)
from test_docs import metrics_in_code

ROOT = Path(__file__).resolve().parents[2]
RULE_TESTS = ("alerts.test.yml", "slow-burn.test.yml")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed (.ci/run installs Debian's prometheus package)")
    return found


def run_promtool(*args: str) -> str:
    done = subprocess.run(
        [promtool(), *args], cwd=OBSERVABILITY, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.integration  # runs promtool
def test_promtool_check_rules() -> None:
    out = run_promtool("check", "rules", *RULE_FILES)
    assert out.count("SUCCESS") == len(RULE_FILES)


@pytest.mark.integration  # runs promtool
def test_promtool_test_rules() -> None:
    run_promtool("test", "rules", *RULE_TESTS)


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    tests = [
        t for f in RULE_TESTS for t in yaml.safe_load((OBSERVABILITY / f).read_text())["tests"]
    ]
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = set(alerts())
    assert names - fires == set(), "alerts no promtool case fires"
    assert names - quiet == set(), "alerts no promtool case keeps quiet"
    assert (fires | quiet) <= names, "promtool cases for alerts that do not exist"


def test_rules_name_only_existing_series() -> None:
    known = exposed_series() | recorded_names()
    unknown = {
        (rule.get("record") or rule["alert"], name)
        for group in rule_groups()
        for rule in group["rules"]
        for name in series_in(rule["expr"])
        if name not in known
    }
    assert not unknown, f"rule expressions name series nobody exposes or records: {unknown}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return out


def test_every_alert_names_an_existing_runbook_section() -> None:
    broken = {}
    for name, rule in alerts().items():
        target = rule.get("annotations", {}).get("runbook", "")
        path, _, anchor = target.partition("#")
        file = ROOT / path
        if not path or not file.is_file() or anchor not in _anchors(file.read_text()):
            broken[name] = target
    assert not broken, f"alerts whose runbook annotation names no section: {broken}"


def test_series_in_reads_promql() -> None:
    expr = (
        'sum by (job, le) (rate(a_bucket{le="0.3", x=~"b|c"}[5m] offset 1h))'
        " / ignoring (reason) group_left sum(x:y:z) > (14.4 * 0.001) unless on (job) abs(d) > 1e3"
    )
    assert series_in(expr) == {"a_bucket", "x:y:z", "d"}


def _indicator_rows() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Service level indicators", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if re.fullmatch(r"M\d+", cells[0]):
            rows[cells[0]] = cells
    return rows


def test_indicator_table_names_only_what_exists() -> None:
    """The README's indicator table (M1-M10 -> metrics, recording rules, alerts): every name
    in it must exist, so removing a metric or rule the table documents fails here."""
    rows = _indicator_rows()
    assert sorted(rows, key=lambda m: int(m[1:])) == [f"M{i}" for i in range(1, 11)]
    metrics = exposed_series() | set(metrics_in_code())  # histograms by family name too
    recorded = recorded_names()
    alert_names = set(alerts())
    missing = []
    for indicator, cells in rows.items():
        metric_cell, rules_cell, alerts_cell = cells[-3:]
        for name in re.findall(r"`([a-z_:0-9]+)`", metric_cell):
            if name not in metrics:
                missing.append((indicator, name))
        for name in re.findall(r"`(sidecar:[a-z_:0-9]+)`", rules_cell):
            if name not in recorded:
                missing.append((indicator, name))
        for name in re.findall(r"`(Sidecar\w+)`", alerts_cell):
            if name not in alert_names:
                missing.append((indicator, name))
    assert not missing, f"README indicator table names what does not exist: {missing}"


def test_every_alert_is_in_the_indicator_section() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Service level indicators", 1)[1].split("\n## ", 1)[0]
    absent = sorted(n for n in set(alerts()) if f"`{n}`" not in section)
    assert not absent, f"alerts the README's indicator section does not name: {absent}"
