"""``sidecar check -c FILE [--kind sidecar|authz|broker]``, and ``--check`` on ``run``,
``authz`` and ``broker``: validate a configuration the way the command would, report every
mistake with its file, line and key (exit 2), or print a one-line summary (exit 0)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sidecar.config_files import KINDS, detect_kind
from sidecar.config_source import load_yaml_file


def check_file(path: str, kind: str | None = None) -> int:
    data = load_yaml_file(path)
    name = kind or detect_kind(data)
    checked = KINDS[name]
    summary = checked.summary(checked.parse(data))
    print(f"{path}: valid {checked.command} configuration: {summary}")
    return 0


def add_check_option(parser: argparse.ArgumentParser, kind: str) -> None:
    """``--check`` on a command: validate its ``-c`` file and exit instead of starting."""
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the configuration and exit (0 valid, 2 with every mistake listed)",
    )
    parser.set_defaults(check_kind=kind)


def run_check(args: argparse.Namespace) -> int:
    if args.config is None:
        print(f"sidecar {args.command}: --check needs -c/--config", file=sys.stderr)
        return 2
    return check_file(args.config, args.check_kind)


def _check(args: argparse.Namespace) -> int:
    return check_file(args.config, args.kind)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="validate a configuration file: every mistake with its file, line and key",
        description="Validate a configuration file as the command that reads it would. Exit "
        "0 with a one-line summary when it is valid; exit 2 listing every mistake, each with "
        "its file and line (or the environment variable that set it), the key and what to "
        "put there.",
    )
    p.add_argument("-c", "--config", required=True, help="the YAML file to check")
    p.add_argument(
        "--kind",
        choices=sorted(KINDS),
        default=None,
        help="sidecar (sidecar run), authz or broker; default: told by the file's top-level keys",
    )
    p.set_defaults(func=_check)
