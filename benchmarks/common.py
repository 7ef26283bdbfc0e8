"""Shared pieces of the benchmarks: machine description, wrk runs, CPU accounting, tables."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# wrk prints this JSON line from the Lua done() hook: exact percentiles, not its rounded table.
WRK_DONE_LUA = """
done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"non2xx":%d,"errors":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    envoy = shutil.which("envoy") or str(Path(sys.executable).with_name("envoy"))
    try:
        envoy_version = (
            subprocess.run(
                [envoy, "--version"], capture_output=True, text=True, timeout=20, check=False
            )
            .stdout.strip()
            .split("version:")[-1]
            .strip()
        )
    except OSError:
        envoy_version = "not found"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "envoy": envoy_version,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process and its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and of every descendant (worker processes), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += cpu_seconds(current)
        except OSError:
            continue  # exited meanwhile
        todo += children.get(current, [])
    return total


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    non2xx: int
    errors: int


def run_wrk(
    url: str,
    *,
    duration: float,
    connections: int,
    lua_body: str = "",
    lua_args: list[str] | None = None,
    cpu: int | None = None,
) -> WrkResult:
    """One wrk run with one thread (this machine has two cores to share)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua_body + WRK_DONE_LUA)
        script = f.name
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "5s",
        "-s",
        script,
        url,
    ]
    if lua_args:
        cmd += ["--", *lua_args]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True)
    finally:
        os.unlink(script)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {out.stdout}\n{out.stderr}")
    data = json.loads(line[len("WRKJSON ") :])
    seconds = data["duration_us"] / 1e6
    return WrkResult(
        rps=data["requests"] / seconds if seconds else 0.0,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        requests=data["requests"],
        non2xx=data["non2xx"],
        errors=data["errors"],
    )


def rate_limit_lua(rate: float, connections: int) -> str:
    """wrk has no fixed-rate mode; a per-connection delay approximates ``rate`` requests/s
    (slightly under it, since service time adds to the delay)."""
    ms = max(1, int(connections * 1000 / rate))
    # Random delays (mean ``ms``) keep the connections from firing in lock-step bursts.
    return f"delay = function() return math.random(0, {2 * ms}) end\n"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def timed(fn: Callable[[int], Any], count: int) -> float:
    """CPU µs per call of ``fn(i)`` over ``count`` calls (CPU time, not wall time: this
    machine may be shared)."""
    start = time.process_time()
    for i in range(count):
        fn(i)
    return (time.process_time() - start) / count * 1e6
