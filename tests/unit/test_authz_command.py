"""The worker command line the ``sidecar authz`` parent starts its workers with."""

from __future__ import annotations

import argparse
import sys

from sidecar.authz.command import worker_argv
from sidecar.cli import build_parser


def _parsed(argv: list[str]) -> argparse.Namespace:
    assert argv[:3] == [sys.executable, "-m", "sidecar"]
    return build_parser().parse_args([*argv[3:], "--worker"])


def test_workers_inherit_the_parents_log_level() -> None:
    args = _parsed(worker_argv("/etc/sidecar/authz.yaml", "WARNING"))
    assert args.log_level == "WARNING"
    assert args.worker is True
    assert args.config == "/etc/sidecar/authz.yaml"


def test_without_a_log_level_workers_use_the_default() -> None:
    assert _parsed(worker_argv("authz.yaml", None)).log_level is None
