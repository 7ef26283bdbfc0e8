"""Profile the authorizer behind the real Envoy under wrk load, and print where its time goes.

    .venv/bin/python benchmarks/profile_authz.py [--mode grpc|http] [--kind bearer|dpop]
        [--engine loop] [--duration 8] [--top 25] [--profiler cprofile|py-spy] [--trivial]

Uses the ingress benchmark's machinery (benchmarks/ingress.py: the same authorizer
configuration, Envoy bootstrap, proofs and pinning). ``cprofile`` (default) runs
``sidecar authz`` with cProfile switched on for the load run only (SIGUSR1/SIGUSR2):
deterministic, so every call is counted, with cProfile's own cost (~1 µs per call) added to
each function. ``py-spy`` (``pip install -e '.[bench]'``) samples the unmodified process
(every thread): no added cost, but sampled. ``--trivial`` profiles the
always-allow server (benchmarks/trivial_authz.py) instead. Prints the top functions by self
and by cumulative time, in µs per request, and the process's CPU µs per request from /proc.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_seconds, print_table  # noqa: E402
from benchmarks.ingress import Bench, Server  # noqa: E402


def child(args: list[str], out: str) -> int:
    """Run ``sidecar`` (or the trivial server) with cProfile on between SIGUSR1 and SIGUSR2
    (the load run only: no start-up, no warm-up); the stats are dumped at SIGUSR2. The main
    thread is profiled: the event loop, where the ``loop`` engine and HTTP decide."""
    profiler = cProfile.Profile()

    def on(signum: int, frame: object) -> None:
        profiler.enable()

    def off(signum: int, frame: object) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, off)
    if args[0] == "trivial":
        from benchmarks import trivial_authz

        sys.argv = ["trivial_authz", *args[1:]]
        return trivial_authz.main()
    from sidecar.cli import main as sidecar_main

    return sidecar_main(args)


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


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[3:], sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--kind", choices=("bearer", "dpop"), default="bearer")
    parser.add_argument("--engine", default="loop", help="gRPC engine: loop, threads, aio")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--profiler", choices=("cprofile", "py-spy"), default="cprofile")
    parser.add_argument("--trivial", action="store_true", help="profile the always-allow server")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk not found: run scripts/bench-deps", file=sys.stderr)
        return 2
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if args.profiler == "py-spy" and not Path(spy).exists():
        print("py-spy not found: run scripts/bench-deps", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="wis-prof-") as d:
        tmp = Path(d)
        bench = Bench(tmp, args.duration, args.connections)
        prof = str(tmp / "authz.prof")
        wrap = None
        if args.profiler == "cprofile":
            wrap = [sys.executable, str(Path(__file__).resolve()), "--child", prof]
        server: Server = (
            bench.start_trivial(args.engine, wrap)
            if args.trivial
            else bench.start_sidecar(args.engine, wrap)
        )
        envoy, port = bench.start_envoy(args.mode, server)
        path = "/bearer/x" if args.kind == "bearer" else "/orders/1"
        url = f"http://127.0.0.1:{port}{path}"
        spy_proc = None
        try:
            warm = bench.wrk(url, args.kind, 2, None, 5000)
            cpu0 = cpu_seconds(server.proc.pid)
            if args.profiler == "cprofile":
                os.kill(server.proc.pid, signal.SIGUSR1)
            else:
                spy_proc = subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--format",
                        "raw",
                        "--rate",
                        str(args.rate),
                        "--nonblocking",
                        "--threads",
                        "-o",
                        prof,
                        "--pid",
                        str(server.proc.pid),
                        "--duration",
                        str(round(args.duration)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(0.5)
            peak = bench.wrk(url, args.kind, args.duration, None, max(warm.rps, 500))
            cpu_us = (cpu_seconds(server.proc.pid) - cpu0) / max(peak.requests, 1) * 1e6
            if args.profiler == "cprofile":
                os.kill(server.proc.pid, signal.SIGUSR2)
                deadline = time.monotonic() + 30
                while not Path(prof).exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(0.5)  # dump_stats is writing
            if spy_proc is not None:
                spy_proc.wait(timeout=args.duration + 30)
        finally:
            envoy.stop()
            server.proc.stop(timeout=15)
        requests = peak.requests
        if args.profiler == "cprofile":
            by_self, by_cum = cprofile_rows(prof, requests)
        else:
            by_self, by_cum = pyspy_rows(prof, peak.requests, args.rate)
    label = f"{'trivial' if args.trivial else 'sidecar'} {args.mode}"
    if args.mode == "grpc":
        label += f" engine={args.engine}"
    print(
        f"\n{label} {args.kind}: {peak.rps:,.0f} req/s, {requests} requests profiled, "
        f"{cpu_us:.0f} CPU µs/req ({args.profiler} running)"
    )
    headers = ["self µs/req", "cum µs/req", "calls/req", "function"]
    print("\nby self time")
    print_table(headers, by_self[: args.top])
    print("\nby cumulative time")
    print_table(headers, by_cum[: args.top])
    return 0


if __name__ == "__main__":
    sys.exit(main())
