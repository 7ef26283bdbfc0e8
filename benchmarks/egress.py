"""Egress benchmark: the sidecar's egress proxy (a fresh ES256 DPoP proof and a cached token
injected per request) side by side with a direct call to the same upstream, with Envoy
injecting a static header (the physical limit of a proxy on this machine) and with a trivial
forwarding proxy on the same framework (aiohttp on uvloop, benchmarks/trivial_proxy.py), under
the same load tool (wrk) in one run.

    .venv/bin/python benchmarks/egress.py [--duration 8] [--connections 16]

The upstream is an Envoy answering with a direct response (fast and constant, so the numbers are
the proxies' cost). CPU: the proxy under test (sidecar or Envoy injector) runs alone on CPU 0;
wrk and the upstream share CPU 1, for every configuration including the direct one. Each
configuration is measured at its peak (closed loop, N connections) and then, for latency, at
one common fixed rate (half the sidecar's peak) so that "added latency" compares like with
like. CPU-µs per request comes from /proc. Prints a table and writes
benchmarks/results/egress.json.

The sidecar takes its token from the ``file`` attestor: it publishes its public DPoP key
(``public_jwk_file``) and the benchmark mints a long-lived token bound to it (``cnf.jkt``), so
every request carries ``Authorization: DPoP <token>`` and a freshly signed proof.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
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
)
from tests.integration.harness import (  # noqa: E402
    ManagedProcess,
    free_port,
    start_envoy,
    wait_for_http,
)
from tests.integration.issuer import AUDIENCE, DevIssuer  # noqa: E402

PROXY_CPU = 0
LOAD_CPU = 1  # wrk and the upstream
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)


def pin(pid: int, cpu: int) -> None:
    if shutil.which("taskset"):
        subprocess.run(
            ["taskset", "-a", "-p", "-c", str(cpu), str(pid)], capture_output=True, check=False
        )


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _envoy(port: int, admin: int, route: dict[str, Any], clusters: list[Any]) -> dict[str, Any]:
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "bench",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [ROUTER],
    }
    return {
        "admin": {"address": _address(admin)},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": _address(port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 10000,
                    },
                }
            ]
        },
    }


def upstream_config(port: int, admin: int) -> dict[str, Any]:
    """The upstream every configuration calls: Envoy answering 200 itself."""
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": '{"ok":true}\n'}},
    }
    return _envoy(port, admin, route, [])


def injector_config(port: int, admin: int, upstream: int, token: str, proof: str) -> dict[str, Any]:
    """Envoy as an egress proxy adding a STATIC Authorization and DPoP header: no signing, no
    token logic. The fastest a proxy that adds headers can be here."""
    route = {
        "match": {"prefix": "/"},
        "route": {"cluster": "upstream"},
        "request_headers_to_add": [
            {
                "header": {"key": "authorization", "value": f"DPoP {token}"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            },
            {
                "header": {"key": "dpop", "value": proof},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            },
        ],
    }
    cluster = {
        "name": "upstream",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "upstream",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(upstream)}}]}],
        },
    }
    return _envoy(port, admin, route, [cluster])


@dataclass
class Row:
    name: str
    peak: WrkResult
    fixed: WrkResult
    proxy_cpu_us: float
    sidecar_added_mean_ms: float | None = None


class Bench:
    def __init__(self, tmp: Path, duration: float, connections: int) -> None:
        self.tmp = tmp
        self.duration = duration
        self.connections = connections
        self.processes: list[ManagedProcess] = []

    def close(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()

    def envoy(self, cfg: dict[str, Any], admin: int, name: str, cpu: int) -> ManagedProcess:
        proc = start_envoy(cfg, self.tmp, admin, name=name)
        pin(proc.pid, cpu)
        self.processes.append(proc)
        return proc

    def start_upstream(self) -> int:
        port, admin = free_port(), free_port()
        self.envoy(upstream_config(port, admin), admin, "upstream", LOAD_CPU)
        return port

    def start_sidecar(
        self, upstream: int, wrap: list[str] | None = None
    ) -> tuple[ManagedProcess, int, int]:
        """``sidecar run`` with one egress upstream; ``wrap`` runs it under another command (a
        profiler) that takes the sidecar's arguments after its own."""
        port, admin = free_port(), free_port()
        token_file = self.tmp / "token.jwt"
        jwk_file = self.tmp / "dpop.jwk.json"
        cfg = {
            "identity": {
                "attestor": {"type": "file", "path": str(token_file), "poll_interval": 60},
                "public_jwk_file": str(jwk_file),
                "refresh": {"backoff_initial": 0.1, "backoff_max": 0.5},
            },
            "egress": {
                "upstreams": [
                    {
                        "name": "bench",
                        "listen": f"127.0.0.1:{port}",
                        "upstream": f"http://127.0.0.1:{upstream}",
                        "audience": AUDIENCE,
                    }
                ]
            },
            "admin": {"listen": f"127.0.0.1:{admin}"},
        }
        path = self.tmp / "sidecar.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = ManagedProcess(
            [
                *(wrap or [sys.executable, "-m", "sidecar"]),
                *["--log-level", "ERROR", "run", "-c", str(path)],
            ],
            name="sidecar",
            log_dir=self.tmp,
            cwd=ROOT,
        ).start()
        self.processes.append(proc)
        deadline = time.monotonic() + 30
        while not jwk_file.exists():
            proc.assert_running()
            if time.monotonic() > deadline:
                raise TimeoutError("the sidecar did not publish its public key")
            time.sleep(0.05)
        jkt = json.loads(jwk_file.read_text())["jkt"]
        token_file.write_text(DevIssuer().token(jkt=jkt, ttl=3600))
        wait_for_http(f"http://127.0.0.1:{admin}/readyz", 30, process=proc)
        pin(proc.pid, PROXY_CPU)
        return proc, port, admin

    def start_injector(self, upstream: int) -> tuple[ManagedProcess, int]:
        port, admin = free_port(), free_port()
        issuer = DevIssuer()
        from tests.integration.issuer import client_signer

        signer = client_signer()
        token = issuer.token(jkt=signer.thumbprint, ttl=3600)
        proof = signer.proof(method="GET", url="http://x/", now=time.time(), access_token=token)
        cfg = injector_config(port, admin, upstream, token, proof)
        return self.envoy(cfg, admin, "envoy-injector", PROXY_CPU), port

    def start_trivial(
        self, upstream: int, wrap: list[str] | None = None
    ) -> tuple[ManagedProcess, int]:
        port = free_port()
        proc = ManagedProcess(
            [
                *(
                    [*wrap, "trivial"]
                    if wrap
                    else [sys.executable, "-m", "benchmarks.trivial_proxy"]
                ),
                "--listen",
                f"127.0.0.1:{port}",
                "--upstream",
                f"http://127.0.0.1:{upstream}",
            ],
            name="trivial-proxy",
            log_dir=self.tmp,
            cwd=ROOT,
        ).start()
        self.processes.append(proc)
        deadline = time.monotonic() + 30
        while "ready" not in proc.log_path.read_text():
            proc.assert_running()
            if time.monotonic() > deadline:
                raise TimeoutError("the trivial proxy did not start")
            time.sleep(0.05)
        pin(proc.pid, PROXY_CPU)
        return proc, port

    def wrk(self, url: str, duration: float, rate: float | None = None) -> WrkResult:
        lua = rate_limit_lua(rate, self.connections) if rate else ""
        return run_wrk(
            url, duration=duration, connections=self.connections, lua_body=lua, cpu=LOAD_CPU
        )

    def peak(self, name: str, url: str, proxy: ManagedProcess | None) -> tuple[WrkResult, float]:
        self.wrk(url, 2)  # warm up: connections, caches
        cpu0 = cpu_seconds(proxy.pid) if proxy else 0.0
        result = self.wrk(url, self.duration)
        cpu_us = (cpu_seconds(proxy.pid) - cpu0) / max(result.requests, 1) * 1e6 if proxy else 0.0
        print(
            f"  {name}: peak {result.rps:,.0f} req/s, p50 {result.p50_ms:.2f} ms, "
            f"p99 {result.p99_ms:.2f} ms, non-2xx {result.non2xx}, errors {result.errors}",
            flush=True,
        )
        return result, cpu_us


def _added_mean_ms(admin: int) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = re.search(
        r'^sidecar_egress_added_latency_seconds_sum\{upstream="bench"\} (\S+)$', text, re.M
    )
    count = re.search(
        r'^sidecar_egress_added_latency_seconds_count\{upstream="bench"\} (\S+)$', text, re.M
    )
    if not total or not count or float(count.group(1)) == 0:
        return None
    return float(total.group(1)) / float(count.group(1)) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per peak run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/egress.json"))
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk not found: run scripts/bench-deps", file=sys.stderr)
        return 2
    info = machine()
    print("machine:", json.dumps(info))
    with tempfile.TemporaryDirectory(prefix="wis-egress-bench-") as d:
        bench = Bench(Path(d), args.duration, args.connections)
        try:
            upstream = bench.start_upstream()
            sidecar, sidecar_port, sidecar_admin = bench.start_sidecar(upstream)
            injector, injector_port = bench.start_injector(upstream)
            trivial, trivial_port = bench.start_trivial(upstream)
            urls = {
                "direct (no proxy)": (f"http://127.0.0.1:{upstream}/orders/42", None),
                "envoy, static header": (f"http://127.0.0.1:{injector_port}/orders/42", injector),
                "aiohttp proxy, trivial": (f"http://127.0.0.1:{trivial_port}/orders/42", trivial),
                "sidecar egress (DPoP)": (f"http://127.0.0.1:{sidecar_port}/orders/42", sidecar),
            }
            peaks = {name: bench.peak(name, url, proc) for name, (url, proc) in urls.items()}
            fixed_rate = peaks["sidecar egress (DPoP)"][0].rps / 2
            print(f"  latency at a fixed {fixed_rate:,.0f} req/s for all:", flush=True)
            rows = []
            for name, (url, _) in urls.items():
                fixed = bench.wrk(url, args.duration * 0.75, fixed_rate)
                print(f"    {name}: p50 {fixed.p50_ms:.3f} ms, p99 {fixed.p99_ms:.3f} ms")
                peak, cpu_us = peaks[name]
                rows.append(Row(name, peak, fixed, cpu_us))
            rows[-1].sidecar_added_mean_ms = _added_mean_ms(sidecar_admin)
        finally:
            bench.close()
    direct, envoy, trivial_row, side = rows
    summary = {
        "sidecar_vs_envoy_rps": side.peak.rps / envoy.peak.rps,
        "sidecar_vs_trivial_aiohttp_rps": side.peak.rps / trivial_row.peak.rps,
        "sidecar_vs_direct_rps": side.peak.rps / direct.peak.rps,
        "envoy_vs_direct_rps": envoy.peak.rps / direct.peak.rps,
        "fixed_rate": fixed_rate,
        "sidecar_added_p50_ms": side.fixed.p50_ms - direct.fixed.p50_ms,
        "sidecar_added_p99_ms": side.fixed.p99_ms - direct.fixed.p99_ms,
        "envoy_added_p50_ms": envoy.fixed.p50_ms - direct.fixed.p50_ms,
        "envoy_added_p99_ms": envoy.fixed.p99_ms - direct.fixed.p99_ms,
        "sidecar_in_proxy_mean_ms": side.sidecar_added_mean_ms,
    }
    headers = [
        "config",
        "peak req/s",
        "x envoy",
        "p50 ms",
        "p99 ms",
        "non2xx",
        "proxy CPU µs/req",
        "@fixed rate p50 ms",
        "p99 ms",
        "added p50 ms",
        "added p99 ms",
    ]
    table = []
    for r in rows:
        added50 = r.fixed.p50_ms - direct.fixed.p50_ms
        added99 = r.fixed.p99_ms - direct.fixed.p99_ms
        table.append(
            [
                r.name,
                f"{r.peak.rps:,.0f}",
                f"{r.peak.rps / envoy.peak.rps:.2f}",
                f"{r.peak.p50_ms:.2f}",
                f"{r.peak.p99_ms:.2f}",
                str(r.peak.non2xx + r.fixed.non2xx + r.peak.errors + r.fixed.errors),
                f"{r.proxy_cpu_us:.0f}" if r.proxy_cpu_us else "-",
                f"{r.fixed.p50_ms:.3f}",
                f"{r.fixed.p99_ms:.3f}",
                "-" if r is direct else f"{added50:.3f}",
                "-" if r is direct else f"{added99:.3f}",
            ]
        )
    print()
    print_table(headers, table)
    print()
    print(
        f"sidecar = {summary['sidecar_vs_trivial_aiohttp_rps']:.2f}x the trivial aiohttp proxy's, "
        f"{summary['sidecar_vs_envoy_rps']:.2f}x Envoy's req/s "
        f"({summary['sidecar_vs_direct_rps']:.2f}x direct); added p50 "
        f"{summary['sidecar_added_p50_ms']:.3f} ms, p99 {summary['sidecar_added_p99_ms']:.3f} ms "
        f"at {fixed_rate:,.0f} req/s; in-proxy time (its own histogram, mean) "
        + (
            f"{side.sidecar_added_mean_ms:.3f} ms"
            if side.sidecar_added_mean_ms is not None
            else "n/a"
        )
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": info,
                "connections": args.connections,
                "duration": args.duration,
                "summary": summary,
                "rows": [asdict(r) for r in rows],
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
