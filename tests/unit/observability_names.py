"""What a PromQL expression may name: the series the package exposes (from the source scan
of test_docs, which another test keeps equal to what the metric classes register) and the
recording rules in deploy/observability. Shared by the rules and dashboard tests."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from test_docs import metrics_in_code

OBSERVABILITY = Path(__file__).resolve().parents[2] / "deploy" / "observability"
RULE_FILES = ("recording.rules.yml", "alerts.rules.yml")

# Words in PromQL that are not series names: functions, aggregations, keywords.
_NOT_SERIES = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right|offset|bool|and|or|unless|le)\b"
)
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_NUMBERS = re.compile(r"(?<![a-zA-Z0-9_:])[0-9][0-9.e]*(?:ms|[smhdwy])?")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def series_in(expr: str) -> set[str]:
    """The metric and recording-rule names a PromQL expression selects: identifiers that are
    neither function calls, keywords, label names nor inside strings, matchers or ranges."""
    text = _STRINGS.sub('""', expr)
    text = _LABEL_LISTS.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _NOT_SERIES.sub(" ", text)
    text = _NUMBERS.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("("):
            continue  # a function or aggregation
        names.add(match.group())
    return names


def exposed_series() -> set[str]:
    """Every series name the package's metrics expose."""
    names: set[str] = set()
    for name, (kind, _labels) in metrics_in_code().items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        else:
            names.add(name)
    return names


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for name in RULE_FILES:
        groups += yaml.safe_load((OBSERVABILITY / name).read_text())["groups"]
    return groups


def recorded_names() -> set[str]:
    return {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}
