"""Committed configuration files rendered from :mod:`sidecar.demo.topology`: render, write,
or check that what is on disk is current (``--check``, as ``envoy/render.py`` does)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

#: The checkout this module belongs to (the committed files live under ``deploy/``). In an
#: installed copy there is no such folder: pass ``--out-dir``.
REPO_ROOT = Path(__file__).resolve().parents[2]


def header(command: str, *notes: str) -> str:
    lines = [
        f"# GENERATED FILE - do not edit. Rendered by `{command}`",
        "# from sidecar/demo/topology.py (a test fails when this file and the generator differ).",
        *(f"# {note}" if note else "#" for note in notes),
    ]
    return "\n".join(lines) + "\n"


def dump(data: Mapping[str, Any]) -> str:
    """YAML in the key order the topology builds (our configs are plain dicts and lists)."""
    text: str = yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False, width=100)
    return text


def sync(rendered: Mapping[str, str], out_dir: Path, *, check: bool, command: str) -> int:
    """Write ``rendered`` (file name → text) into ``out_dir``, or with ``check`` only report
    the files that differ. Returns the exit status."""
    stale: list[str] = []
    for name, text in rendered.items():
        path = out_dir / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(name)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if check and stale:
        print(f"stale in {out_dir}: {', '.join(stale)} (run: {command})", file=sys.stderr)
        return 1
    return 0


def main(
    argv: list[str] | None,
    *,
    description: str,
    render: Callable[[], Mapping[str, str]],
    default_dir: Path,
    command: str,
) -> int:
    parser = argparse.ArgumentParser(description=description)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="(re)write the files that differ")
    mode.add_argument("--check", action="store_true", help="exit 1 if a file differs")
    parser.add_argument("--out-dir", type=Path, default=default_dir, help=f"default: {default_dir}")
    args = parser.parse_args(argv)
    return sync(render(), args.out_dir, check=args.check, command=command)
