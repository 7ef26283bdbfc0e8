"""Profile the egress proxy under wrk load, and print where its time goes.

    .venv/bin/python benchmarks/profile_egress.py [--duration 8] [--top 25]
        [--profiler cprofile|py-spy] [--trivial] [--save FILE]

Uses the egress benchmark's machinery (benchmarks/egress.py: the same sidecar configuration,
a token minted for its published key, an Envoy upstream answering directly, and the pinning:
the proxy alone on CPU 0, wrk and the upstream on CPU 1). ``cprofile`` (default) runs
``sidecar run`` with cProfile switched on for the load run only (SIGUSR1/SIGUSR2): every call
counted, with cProfile's own cost (~1 µs per call) added to each function, and the cyclic
garbage collector's time per generation. ``py-spy`` samples the unmodified process: no added
cost, but sampled (line by line; an await resumed by the event loop starts a new stack, so its
cumulative times are partial — read its self times). ``--trivial`` profiles the trivial
aiohttp proxy (benchmarks/trivial_proxy.py) instead, for the framework's own share.
``--save`` keeps the raw profile (pstats, or py-spy's collapsed stacks). Prints the top
functions by self and by cumulative time in µs per request, and the process's CPU µs per
request from /proc.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_seconds  # noqa: E402
from benchmarks.egress import Bench  # noqa: E402
from benchmarks.profiling import ProfileRun, add_options, child  # noqa: E402


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[3:], sys.argv[2], "benchmarks.trivial_proxy")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trivial", action="store_true", help="profile the trivial proxy")
    add_options(parser)
    args = parser.parse_args()
    missing = ProfileRun.missing_tool(args.profiler)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="wis-prof-egress-") as d:
        tmp = Path(d)
        bench = Bench(tmp, args.duration, args.connections)
        run = ProfileRun(args, str(Path(__file__).resolve()), tmp)
        try:
            upstream = bench.start_upstream()
            if args.trivial:
                proc, port = bench.start_trivial(upstream, run.wrap())
            else:
                proc, port, _admin = bench.start_sidecar(upstream, run.wrap())
            url = f"http://127.0.0.1:{port}/orders/42"
            bench.wrk(url, 2)  # warm up: connections, caches
            cpu0 = cpu_seconds(proc.pid)
            run.start(proc.pid)
            peak = bench.wrk(url, args.duration)
            cpu_us = (cpu_seconds(proc.pid) - cpu0) / max(peak.requests, 1) * 1e6
            run.stop()
        finally:
            bench.close()
        label = "trivial aiohttp proxy" if args.trivial else "sidecar egress (DPoP)"
        run.report(label, peak.rps, peak.requests, cpu_us, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
