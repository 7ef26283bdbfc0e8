"""What the profiling harnesses share (benchmarks/profile_authz.py, profile_egress.py): a
profiler around one load run — cProfile in the server process, switched by signals, or py-spy
attached from outside — and its report in µs per request."""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib
import json
import os
import pstats
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks.common import print_table

ROOT = Path(__file__).resolve().parents[1]


def profiled(out: str) -> None:
    """Switch cProfile on at SIGUSR1 and off at SIGUSR2 (the load run only: no start-up, no
    warm-up), dumping the stats to ``out`` at SIGUSR2. The main thread is profiled: the event
    loop, where the ``loop`` engine, HTTP and the egress proxy do their work."""
    profiler = cProfile.Profile()
    gc_time = [0.0, 0.0, 0.0]  # seconds in collections of generation 0, 1, 2
    gc_count = [0, 0, 0]
    gc_started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            gen = info["generation"]
            gc_time[gen] += time.perf_counter() - gc_started[0]
            gc_count[gen] += 1

    def on(signum: int, frame: object) -> None:
        gc.callbacks.append(on_gc)
        profiler.enable()

    def off(signum: int, frame: object) -> None:
        profiler.disable()
        gc.callbacks.remove(on_gc)
        Path(out + ".gc").write_text(json.dumps({"seconds": gc_time, "count": gc_count}))
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, off)


def child(args: list[str], out: str, trivial_module: str) -> int:
    """The harness's ``--child``: ``sidecar ARGS`` (or, for ``trivial ARGS``, the trivial
    server's ``main``) under :func:`profiled`."""
    profiled(out)
    if args[0] == "trivial":
        module = importlib.import_module(trivial_module)
        sys.argv = [trivial_module, *args[1:]]
        return int(module.main())
    from sidecar.cli import main as sidecar_main

    return sidecar_main(args)


def gc_summary(path: str, requests: int) -> str:
    """The cyclic collector's share of the profiled run (written by :func:`profiled`)."""
    data = json.loads(Path(path + ".gc").read_text())
    per = 1e6 / max(requests, 1)
    parts = [
        f"gen{gen} {n} x, {t * per:.1f} µs/req"
        for gen, (n, t) in enumerate(zip(data["count"], data["seconds"], strict=True))
    ]
    return "garbage collection: " + "; ".join(parts)


def cprofile_rows(path: str, requests: int) -> tuple[list[list[str]], list[list[str]]]:
    stats = pstats.Stats(path)
    entries = stats.stats  # type: ignore[attr-defined]
    per = 1e6 / max(requests, 1)

    def name(func: tuple[str, int, str]) -> str:
        file, line, fn = func
        short = file.replace(str(ROOT) + "/", "").split("site-packages/")[-1]
        return f"{fn} ({short}:{line})" if line else fn

    rows = [(name(func), cc, nc, tt, ct) for func, (cc, nc, tt, ct, _callers) in entries.items()]
    by_self = sorted(rows, key=lambda r: r[3], reverse=True)
    by_cum = sorted(rows, key=lambda r: r[4], reverse=True)

    def fmt(r: tuple[str, int, int, float, float]) -> list[str]:
        return [f"{r[3] * per:.1f}", f"{r[4] * per:.1f}", f"{r[2] / max(requests, 1):.2f}", r[0]]

    return [fmt(r) for r in by_self], [fmt(r) for r in by_cum]


def pyspy_rows(path: str, requests: int, rate: int) -> tuple[list[list[str]], list[list[str]]]:
    """Collapsed stacks (``frame;frame;... count``) to self and cumulative µs per request."""
    self_n: Counter[str] = Counter()
    cum_n: Counter[str] = Counter()
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        self_n[frames[-1]] += int(count)
        for frame in set(frames):
            cum_n[frame] += int(count)
    per = 1e6 / rate / max(requests, 1)  # one sample = 1/rate seconds

    def rows(counts: Counter[str]) -> list[list[str]]:
        return [
            [f"{self_n[f] * per:.1f}", f"{cum_n[f] * per:.1f}", "-", f]
            for f, _ in counts.most_common()
        ]

    return rows(self_n), rows(cum_n)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--profiler", choices=("cprofile", "py-spy"), default="cprofile")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    parser.add_argument("--save", help="also copy the raw profile (pstats or collapsed) here")


class ProfileRun:
    """One profiled load run of one process. With cProfile the process runs under
    :meth:`wrap` (the harness's ``--child``), with py-spy it is attached to."""

    def __init__(self, args: argparse.Namespace, script: str, tmp: Path) -> None:
        self.profiler: str = args.profiler
        self.rate: int = args.rate
        self.duration: float = args.duration
        self.save: str | None = args.save
        self.script = script
        self.out = str(tmp / "profile.out")
        self._spy: subprocess.Popen[bytes] | None = None
        self._pid = 0

    @staticmethod
    def missing_tool(profiler: str) -> str | None:
        """Why this run cannot happen (a tool to install), or None."""
        if not shutil.which("wrk"):
            return "wrk not found: run scripts/bench-deps"
        if profiler == "py-spy" and not Path(_spy_path()).exists():
            return "py-spy not found: run scripts/bench-deps"
        return None

    def wrap(self) -> list[str] | None:
        """The command to start the process under (it takes the process's arguments next)."""
        if self.profiler != "cprofile":
            return None
        return [sys.executable, self.script, "--child", self.out]

    def start(self, pid: int) -> None:
        self._pid = pid
        if self.profiler == "cprofile":
            os.kill(pid, signal.SIGUSR1)
            return
        self._spy = subprocess.Popen(
            [
                *(_spy_path(), "record", "--format", "raw", "--rate", str(self.rate)),
                *("--nonblocking", "--threads", "-o", self.out, "--pid", str(pid)),
                *("--duration", str(round(self.duration))),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)

    def stop(self) -> None:
        if self.profiler == "cprofile":
            os.kill(self._pid, signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not Path(self.out).exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)  # dump_stats is writing
        if self._spy is not None:
            self._spy.wait(timeout=self.duration + 30)

    def report(self, label: str, rps: float, requests: int, cpu_us: float, top: int) -> None:
        """Print the run's top functions by self and by cumulative time, per request."""
        if self.save:
            shutil.copyfile(self.out, self.save)
        gc_line = ""
        if self.profiler == "cprofile":
            gc_line = gc_summary(self.out, requests)
            by_self, by_cum = cprofile_rows(self.out, requests)
        else:
            by_self, by_cum = pyspy_rows(self.out, requests, self.rate)
        print(
            f"\n{label}: {rps:,.0f} req/s, {requests} requests profiled, "
            f"{cpu_us:.0f} CPU µs/req ({self.profiler} running)"
        )
        if gc_line:
            print(gc_line)
        headers = ["self µs/req", "cum µs/req", "calls/req", "function"]
        print("\nby self time")
        print_table(headers, by_self[:top])
        print("\nby cumulative time")
        print_table(headers, by_cum[:top])


def _spy_path() -> str:
    return shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
