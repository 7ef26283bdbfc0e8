"""Profile the authorizer behind the real Envoy under wrk load, and print where its time goes.

    .venv/bin/python benchmarks/profile_authz.py [--mode grpc|http] [--kind bearer|dpop]
        [--engine loop] [--duration 8] [--top 25] [--profiler cprofile|py-spy] [--trivial]
        [--save FILE]

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
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_seconds  # noqa: E402
from benchmarks.ingress import Bench, Server  # noqa: E402
from benchmarks.profiling import ProfileRun, add_options, child  # noqa: E402


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[3:], sys.argv[2], "benchmarks.trivial_authz")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--kind", choices=("bearer", "dpop"), default="bearer")
    parser.add_argument("--engine", default="loop", help="gRPC engine: loop, threads, aio")
    parser.add_argument("--trivial", action="store_true", help="profile the always-allow server")
    add_options(parser)
    args = parser.parse_args()
    missing = ProfileRun.missing_tool(args.profiler)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="wis-prof-") as d:
        tmp = Path(d)
        bench = Bench(tmp, args.duration, args.connections)
        run = ProfileRun(args, str(Path(__file__).resolve()), tmp)
        wrap = run.wrap()
        server: Server = (
            bench.start_trivial(args.engine, wrap)
            if args.trivial
            else bench.start_sidecar(args.engine, wrap)
        )
        envoy, port = bench.start_envoy(args.mode, server)
        path = "/bearer/x" if args.kind == "bearer" else "/orders/1"
        url = f"http://127.0.0.1:{port}{path}"
        try:
            warm = bench.wrk(url, args.kind, 2, None, 5000)
            cpu0 = cpu_seconds(server.proc.pid)
            run.start(server.proc.pid)
            peak = bench.wrk(url, args.kind, args.duration, None, max(warm.rps, 500))
            cpu_us = (cpu_seconds(server.proc.pid) - cpu0) / max(peak.requests, 1) * 1e6
            run.stop()
        finally:
            envoy.stop()
            server.proc.stop(timeout=15)
        label = f"{'trivial' if args.trivial else 'sidecar'} {args.mode}"
        if args.mode == "grpc":
            label += f" engine={args.engine}"
        run.report(f"{label} {args.kind}", peak.rps, peak.requests, cpu_us, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
