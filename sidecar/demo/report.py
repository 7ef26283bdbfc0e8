"""The walkthrough's outcome: one row per step, printed as a table and written as JSON."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO


@dataclass
class Step:
    number: int
    title: str
    expected: str
    observed: str = "not run"
    ok: bool = False
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    steps: list[Step] = field(default_factory=list)
    topology: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "steps": [asdict(s) for s in self.steps], **self.topology}

    def write_json(self, path: Path) -> None:
        # Atomically: a reader polling for the file never sees half of it.
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.as_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False) or [""]


def print_table(steps: list[Step], out: TextIO) -> None:
    """Columns: #, step, expected, observed, result; long cells wrap within their column."""
    total = max(100, min(160, shutil.get_terminal_size((120, 40)).columns))
    widths = [2, 30, 26, total - 2 - 30 - 26 - 6 - 4 * 2]
    heads = ["#", "step", "expected", "observed", "result"]
    line = "  ".join(h.ljust(w) for h, w in zip(heads, [*widths, 6], strict=True))
    out.write(line.rstrip() + "\n" + "-" * len(line.rstrip()) + "\n")
    for step in steps:
        cells = [
            [str(step.number)],
            _wrap(step.title, widths[1]),
            _wrap(step.expected, widths[2]),
            _wrap(step.observed, widths[3]),
            ["PASS" if step.ok else "FAIL"],
        ]
        for i in range(max(len(c) for c in cells)):
            row = [
                (c[i] if i < len(c) else "").ljust(w)
                for c, w in zip(cells, [*widths, 6], strict=True)
            ]
            out.write("  ".join(row).rstrip() + "\n")
        out.write("\n")
    out.flush()
