"""A live /metrics page: ``promtool check metrics`` over it (promtool: Debian's prometheus package,
installed by .ci/run), and its samples."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import http_request


def promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (.ci/run installs Debian's prometheus package)")
    return tool


def check_live_metrics(url: str) -> str:
    """Fetch ``url`` and fail unless promtool finds nothing to complain about; the page."""
    tool = promtool()
    status, _, body = http_request(url)
    assert status == 200
    done = subprocess.run([tool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    problems = (done.stdout + done.stderr).decode()
    assert done.returncode == 0 and not problems.strip(), problems
    return body.decode()


def sample(page: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a metrics page, or None if it is not there."""
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None
