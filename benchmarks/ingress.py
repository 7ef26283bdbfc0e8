"""Ingress benchmark: Envoy alone, Envoy's native jwt_authn, and Envoy + our ext_authz (gRPC and
HTTP; bearer with the verified-token cache, and full DPoP with a fresh proof per request),
each next to a trivial always-allow server of the same transport (benchmarks/trivial_authz.py),
under the same load tool (wrk) in one run on this machine.

    .venv/bin/python benchmarks/ingress.py [--duration 8] [--connections 16] [--engines loop]
        [--fixed-rate 400] [--rounds 1]

Envoy answers with a direct response, so the numbers are the cost of authorization alone.
CPU: Envoy is pinned to CPU 0; the authorizer and wrk share CPU 1. CPU-µs per request is taken
from /proc for each process, so the cost is visible even where the core is shared; "overhead"
is the authorizer's CPU-µs per request minus the trivial server's of the same transport, at
each one's peak and at one common rate (``--fixed-rate``, 400 req/s: below every peak here),
where both see the same arrivals and so the same batching. ``--rounds N`` repeats the whole
plan and shows each row's median round (this VM's rows vary by tens of µs between runs).
Prints a table and writes benchmarks/results/ingress.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    WrkResult,
    cpu_seconds,
    machine,
    print_table,
    rate_limit_lua,
    run_wrk,
    tree_cpu_seconds,
)
from sidecar.envoy_config import ingress_bootstrap  # noqa: E402
from tests.integration.harness import (  # noqa: E402
    ManagedProcess,
    free_port,
    start_envoy,
    wait_for_http,
)
from tests.integration.issuer import AUDIENCE, DevIssuer, client_signer  # noqa: E402

WRK_CPU = 1
ENVOY_CPU = 0
SIDECAR_CPU = 1

HEADERS_LUA = """
local proofs, idx, auth = {}, 0, nil
init = function(args)
  auth = args[1]
  if args[2] ~= nil then
    for line in io.lines(args[2]) do proofs[#proofs + 1] = line end
  end
end
request = function()
  if #proofs == 0 then
    return wrk.format("GET", nil, {["Authorization"] = auth})
  end
  idx = idx + 1
  if idx > #proofs then idx = 1 end
  return wrk.format("GET", nil, {["Authorization"] = auth, ["DPoP"] = proofs[idx]})
end
"""


@dataclass
class Server:
    """An authorizer process (the sidecar, or a trivial always-allow one) and its ports."""

    proc: ManagedProcess
    grpc_port: int
    http_port: int
    unix_dir: Path | None = None  # listening on unix sockets there instead of the ports
    workers: int = 1

    def socket(self, mode: str) -> str | None:
        return None if self.unix_dir is None else str(self.unix_dir / f"{mode}.sock")


@dataclass
class Row:
    name: str
    transport: str  # "grpc-<engine>", "http" or "" (Envoy alone / jwt_authn)
    trivial: bool
    peak: WrkResult
    half: WrkResult
    half_rate: float
    baseline_at_half: WrkResult | None
    envoy_cpu_us: float
    sidecar_cpu_us: float
    #: The authorizer's CPU-µs per request at one rate common to every row (``--fixed-rate``):
    #: at peak each server batches as many checks per read as its own speed allows, so a
    #: slower one also pays more per read; at one rate both see the same arrivals.
    fixed_rate: float = 0.0
    sidecar_cpu_us_fixed: float = 0.0


def pin(pid: int, cpu: int) -> None:
    if shutil.which("taskset"):
        subprocess.run(
            ["taskset", "-a", "-p", "-c", str(cpu), str(pid)], capture_output=True, check=False
        )


def direct_response(cfg: dict[str, Any]) -> dict[str, Any]:
    """Answer from Envoy itself and log nothing: measure the auth filter, not an upstream."""
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm.pop("access_log", None)
    vh = hcm["route_config"]["virtual_hosts"][0]
    vh["routes"] = [
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
        }
    ]
    return cfg


class Bench:
    def __init__(
        self, tmp: Path, duration: float, connections: int, fixed_rate: float = 0.0
    ) -> None:
        self.fixed_rate = fixed_rate
        self.tmp = tmp
        self.duration = duration
        self.connections = connections
        self.issuer = DevIssuer()
        self.signer = client_signer()
        self.jwks = self.issuer.write_jwks(tmp / "jwks.json")
        # Long-lived tokens: the run must not outlive them.
        self.bound = self.issuer.token(jkt=self.signer.thumbprint, ttl=3600)
        self.unbound = self.issuer.token(ttl=3600)

    def start_sidecar(
        self, engine: str, wrap: list[str] | None = None, *, unix: bool = False, workers: int = 1
    ) -> Server:
        """``sidecar authz`` with ``engine``; ``wrap`` runs it under another command (a
        profiler) that takes the sidecar's arguments after its own; ``unix``: its listeners
        are unix sockets instead of TCP ports; ``workers`` > 1: that many worker processes,
        not pinned (they are there to use every core)."""
        grpc_port, http_port, admin_port = free_port(), free_port(), free_port()
        name = f"authz-{engine}{'-unix' if unix else ''}{f'-w{workers}' if workers > 1 else ''}"
        unix_dir = self.tmp / name if unix else None
        grpc_listen, http_listen = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"
        if unix_dir is not None:
            unix_dir.mkdir()
            grpc_listen, http_listen = f"unix:{unix_dir}/grpc.sock", f"unix:{unix_dir}/http.sock"
        cfg: dict[str, Any] = {
            "authz": {
                "audience": AUDIENCE,
                "issuers": [{"issuer": self.issuer.issuer, "jwks_file": str(self.jwks)}],
                "grpc": {"listen": grpc_listen, "engine": engine},
                "http": {"listen": http_listen},
                "replay": {"max_memory": 256},
                "routes": [{"prefix": "/bearer", "auth": "bearer"}],
                "rules": [{"name": "all", "principals": ["**"], "paths": ["/"]}],
            },
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
        }
        if workers > 1:
            cfg["authz"]["workers"] = workers
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        argv = ["--log-level", "WARNING", "authz", "-c", str(path)]
        proc = ManagedProcess(
            [*(wrap or [sys.executable, "-m", "sidecar"]), *argv],
            name=name,
            log_dir=self.tmp,
        ).start()
        wait_for_http(f"http://127.0.0.1:{admin_port}/readyz", 30, process=proc)
        if workers == 1:
            pin(proc.pid, SIDECAR_CPU)
        return Server(proc, grpc_port, http_port, unix_dir, workers)

    def start_trivial(
        self, engine: str, wrap: list[str] | None = None, answer: str = "plain"
    ) -> Server:
        grpc_port, http_port = free_port(), free_port()
        argv = [
            "--answer",
            answer,
            "--engine",
            engine,
            "--grpc",
            f"127.0.0.1:{grpc_port}",
            "--http",
            f"127.0.0.1:{http_port}",
        ]
        proc = ManagedProcess(
            [
                *(
                    [*wrap, "trivial"]
                    if wrap
                    else [sys.executable, "-m", "benchmarks.trivial_authz"]
                ),
                *argv,
            ],
            name=f"trivial-{engine}-{answer}",
            log_dir=self.tmp,
            cwd=ROOT,
        ).start()
        deadline = time.monotonic() + 30
        while "ready" not in proc.log_path.read_text():
            if time.monotonic() > deadline or proc.returncode is not None:
                raise RuntimeError(f"trivial server did not start: {proc.log_path.read_text()}")
            time.sleep(0.1)
        pin(proc.pid, SIDECAR_CPU)
        return Server(proc, grpc_port, http_port)

    def start_envoy(self, mode: str, server: Server | None) -> tuple[ManagedProcess, int]:
        port, admin = free_port(), free_port()
        authz_port, authz_unix = 0, None
        if server is not None:
            authz_port = server.grpc_port if mode == "grpc" else server.http_port
            authz_unix = server.socket(mode)
        cfg = ingress_bootstrap(
            listen_port=port,
            upstream_port=free_port(),
            admin_port=admin,
            mode=mode,  # type: ignore[arg-type]
            authz_port=authz_port,
            authz_unix=authz_unix,
            authz_workers=server.workers if server is not None else 1,
            jwt_issuer=self.issuer.issuer,
            jwt_audiences=[AUDIENCE],
            jwt_jwks_file=str(self.jwks),
            authz_timeout_ms=1000,
        )
        proc = start_envoy(direct_response(cfg), self.tmp, admin, name=f"envoy-{mode}-{port}")
        pin(proc.pid, ENVOY_CPU)
        return proc, port

    def proofs_file(self, url: str, count: int) -> str:
        path = self.tmp / f"proofs-{time.monotonic_ns()}.txt"
        now = time.time()
        with path.open("w") as f:
            for _ in range(count):
                f.write(self.signer.proof(method="GET", url=url, now=now, access_token=self.bound))
                f.write("\n")
        return str(path)

    def wrk(
        self, url: str, kind: str, duration: float, rate: float | None, expect: float
    ) -> WrkResult:
        lua = HEADERS_LUA + (rate_limit_lua(rate, self.connections) if rate else "")
        if kind == "dpop":
            args = [
                f"DPoP {self.bound}",
                self.proofs_file(url, int(expect * duration * 1.3) + 2000),
            ]
        else:  # bearer; with no auth filter Envoy ignores the header
            args = [f"Bearer {self.unbound}"]
        return run_wrk(
            url,
            duration=duration,
            connections=self.connections,
            lua_body=lua,
            lua_args=args,
            cpu=WRK_CPU,
        )

    def measure(
        self,
        name: str,
        mode: str,
        kind: str,
        server: Server | None,
        baseline_port: int | None,
        transport: str = "",
        trivial: bool = False,
    ) -> Row:
        envoy, port = self.start_envoy(mode, server)
        path = "/bearer/x" if kind == "bearer" and mode != "jwt_authn" else "/orders/1"
        url = f"http://127.0.0.1:{port}{path}"
        try:
            warm = self.wrk(url, kind, 2, None, 5000)
            envoy_cpu0 = cpu_seconds(envoy.pid)
            side_cpu0 = tree_cpu_seconds(server.proc.pid) if server else 0.0
            peak = self.wrk(url, kind, self.duration, None, max(warm.rps, 500))
            envoy_us = (cpu_seconds(envoy.pid) - envoy_cpu0) / max(peak.requests, 1) * 1e6
            side_us = 0.0
            if server is not None:
                side_us = (
                    (tree_cpu_seconds(server.proc.pid) - side_cpu0) / max(peak.requests, 1) * 1e6
                )
            fixed_us = 0.0
            if server is not None and self.fixed_rate:
                cpu0 = tree_cpu_seconds(server.proc.pid)
                fixed = self.wrk(url, kind, self.duration, self.fixed_rate, self.fixed_rate)
                fixed_us = (tree_cpu_seconds(server.proc.pid) - cpu0) / max(fixed.requests, 1) * 1e6
            half_rate = peak.rps / 2
            half = self.wrk(url, kind, self.duration * 0.75, half_rate, half_rate)
            base = None
            if baseline_port is not None:
                base_url = f"http://127.0.0.1:{baseline_port}{path}"
                base = self.wrk(base_url, "none", self.duration * 0.75, half_rate, half_rate)
        finally:
            envoy.stop()
        print(f"  {name}: {peak.rps:,.0f} req/s, p99 {peak.p99_ms:.2f} ms", flush=True)
        return Row(
            name,
            transport,
            trivial,
            peak,
            half,
            half_rate,
            base,
            envoy_us,
            side_us,
            self.fixed_rate if fixed_us else 0.0,
            fixed_us,
        )


def overhead(row: Row, rows: list[Row], fixed: bool = False) -> float | None:
    """Authorizer CPU-µs per request above the trivial server of the same transport (at peak,
    or at the common fixed rate)."""
    if row.trivial or not row.transport:
        return None
    base = next((r for r in rows if r.trivial and r.transport == row.transport), None)
    if base is None:
        return None
    if fixed:
        if not (row.sidecar_cpu_us_fixed and base.sidecar_cpu_us_fixed):
            return None
        return row.sidecar_cpu_us_fixed - base.sidecar_cpu_us_fixed
    return row.sidecar_cpu_us - base.sidecar_cpu_us


def median_rows(rounds: list[list[Row]]) -> list[Row]:
    """Per configuration, the round whose peak CPU-µs per request is the median (its other
    columns come with it); the fixed-rate figure is the median of its own."""
    out = []
    for same in zip(*rounds, strict=True):
        ranked = sorted(same, key=lambda r: r.sidecar_cpu_us)
        middle = ranked[len(ranked) // 2]
        fixed = sorted(r.sidecar_cpu_us_fixed for r in same)[len(same) // 2]
        out.append(replace(middle, sidecar_cpu_us_fixed=fixed))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per peak run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--engines", default="loop", help="gRPC engines: loop,threads,aio")
    parser.add_argument(
        "--no-unix", action="store_true", help="skip the unix-socket rows (Envoy pipe to authz)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="also measure this many authz.workers (1: skip)"
    )
    parser.add_argument(
        "--fixed-rate",
        type=float,
        default=400.0,
        help="also measure each authorizer's CPU at this common req/s (0: skip)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole plan this many times; the table shows each row's median round",
    )
    parser.add_argument(
        "--answer-sized",
        action="store_true",
        help="also a trivial server answering with the sidecar's bearer allow (loop, HTTP)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/ingress.json"))
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk not found: run scripts/bench-deps", file=sys.stderr)
        return 2
    engines = [e for e in args.engines.split(",") if e]
    info = machine()
    print("machine:", json.dumps(info))
    with tempfile.TemporaryDirectory(prefix="wis-bench-") as d:
        bench = Bench(Path(d), args.duration, args.connections, args.fixed_rate)
        servers: dict[str, Server] = {}
        baseline, baseline_port = bench.start_envoy("none", None)
        rounds: list[list[Row]] = []
        try:
            for engine in engines:
                servers[f"sidecar-{engine}"] = bench.start_sidecar(engine)
                servers[f"trivial-{engine}"] = bench.start_trivial(engine)
            plan: list[tuple[str, str, str, Server | None, str, bool]] = [
                ("envoy, no auth", "none", "none", None, "", False),
                ("envoy jwt_authn ES256", "jwt_authn", "bearer", None, "", False),
            ]
            for engine in engines:
                t = f"grpc-{engine}"
                side, triv = servers[f"sidecar-{engine}"], servers[f"trivial-{engine}"]
                plan += [
                    (f"gRPC {engine}: trivial allow", "grpc", "bearer", triv, t, True),
                    (f"gRPC {engine}: bearer (cached)", "grpc", "bearer", side, t, False),
                    (f"gRPC {engine}: full DPoP", "grpc", "dpop", side, t, False),
                ]
            side, triv = servers[f"sidecar-{engines[0]}"], servers[f"trivial-{engines[0]}"]
            plan += [
                ("HTTP: trivial allow (aiohttp)", "http", "bearer", triv, "http", True),
                ("HTTP: bearer (cached)", "http", "bearer", side, "http", False),
                ("HTTP: full DPoP", "http", "dpop", side, "http", False),
            ]
            if args.answer_sized and engines[0] == "loop":
                # The trivial server sending what the sidecar sends for a cached bearer: its
                # "overhead" is what the larger answer alone costs.
                sized = servers["trivial-sized"] = bench.start_trivial(
                    "loop", answer="bearer-allow"
                )
                plan += [
                    (
                        "gRPC loop: trivial, answering as the sidecar",
                        "grpc",
                        "bearer",
                        sized,
                        "grpc-loop",
                        False,
                    ),
                    (
                        "HTTP: trivial, answering as the sidecar",
                        "http",
                        "bearer",
                        sized,
                        "http",
                        False,
                    ),
                ]
            if not args.no_unix:
                # The same checks over unix sockets (overhead still against the TCP trivial).
                unix = servers["sidecar-unix"] = bench.start_sidecar(engines[0], unix=True)
                t = f"grpc-{engines[0]}"
                plan += [
                    (f"gRPC {engines[0]}: bearer, unix socket", "grpc", "bearer", unix, t, False),
                    (f"gRPC {engines[0]}: full DPoP, unix socket", "grpc", "dpop", unix, t, False),
                    ("HTTP: bearer, unix socket", "http", "bearer", unix, "http", False),
                    ("HTTP: full DPoP, unix socket", "http", "dpop", unix, "http", False),
                ]
            if args.workers > 1:
                # authz.workers over unix sockets (path.i each): compare with the rows above.
                n = args.workers
                many = servers["sidecar-workers"] = bench.start_sidecar(
                    engines[0], unix=True, workers=n
                )
                t = f"grpc-{engines[0]}"
                plan += [
                    (
                        f"gRPC {engines[0]}: bearer, unix, {n} workers",
                        "grpc",
                        "bearer",
                        many,
                        t,
                        False,
                    ),
                    (
                        f"gRPC {engines[0]}: full DPoP, unix, {n} workers",
                        "grpc",
                        "dpop",
                        many,
                        t,
                        False,
                    ),
                    (f"HTTP: bearer, unix, {n} workers", "http", "bearer", many, "http", False),
                    (f"HTTP: full DPoP, unix, {n} workers", "http", "dpop", many, "http", False),
                ]
            for i in range(args.rounds):
                if args.rounds > 1:
                    print(f"round {i + 1} of {args.rounds}", flush=True)
                rows: list[Row] = []
                for name, mode, kind, server, transport, trivial in plan:
                    base = None if mode == "none" else baseline_port
                    rows.append(bench.measure(name, mode, kind, server, base, transport, trivial))
                rounds.append(rows)
        finally:
            baseline.stop()
            for server in servers.values():
                server.proc.stop()
    rows = median_rows(rounds)
    jwt = next(r for r in rows if r.name.startswith("envoy jwt_authn")).peak.rps
    headers = [
        "config",
        "req/s",
        "p50 ms",
        "p99 ms",
        "x jwt_authn",
        "non2xx",
        "envoy CPU µs/req",
        "authz CPU µs/req",
        "overhead µs/req",
        f"CPU µs/req @{args.fixed_rate:g}/s",
        "overhead",
        "@half rate",
        "p50 ms",
        "p99 ms",
        "added p99 ms",
    ]
    table = []
    for r in rows:
        added = (
            "" if r.baseline_at_half is None else f"{r.half.p99_ms - r.baseline_at_half.p99_ms:.2f}"
        )
        extra = overhead(r, rows)
        extra_fixed = overhead(r, rows, fixed=True)
        table.append(
            [
                r.name,
                f"{r.peak.rps:,.0f}",
                f"{r.peak.p50_ms:.2f}",
                f"{r.peak.p99_ms:.2f}",
                f"{r.peak.rps / jwt:.2f}",
                str(r.peak.non2xx + r.half.non2xx),
                f"{r.envoy_cpu_us:.0f}",
                f"{r.sidecar_cpu_us:.0f}" if r.sidecar_cpu_us else "-",
                "-" if extra is None else f"{extra:+.0f}",
                f"{r.sidecar_cpu_us_fixed:.0f}" if r.sidecar_cpu_us_fixed else "-",
                "-" if extra_fixed is None else f"{extra_fixed:+.0f}",
                f"{r.half_rate:,.0f}",
                f"{r.half.p50_ms:.2f}",
                f"{r.half.p99_ms:.2f}",
                added,
            ]
        )
    print()
    print_table(headers, table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": info,
                "connections": args.connections,
                "duration": args.duration,
                "engines": engines,
                "fixed_rate": args.fixed_rate,
                "rounds": args.rounds,
                "rows": [
                    {
                        **asdict(r),
                        "overhead_cpu_us": overhead(r, rows),
                        "overhead_cpu_us_fixed": overhead(r, rows, fixed=True),
                    }
                    for r in rows
                ],
                "every_round": [
                    [
                        {
                            "name": r.name,
                            "cpu_us": r.sidecar_cpu_us,
                            "cpu_us_fixed": r.sidecar_cpu_us_fixed,
                        }
                        for r in rows_i
                    ]
                    for rows_i in rounds
                ],
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
