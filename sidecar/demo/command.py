"""``sidecar demo``: the whole story on one machine, as local processes.

    broker ─ issuer/STS: verifies the demo cluster's service-account tokens and unix peers
    orders ─ a legacy app that echoes what it receives, behind the real Envoy, whose ext_authz
             goes to orders' sidecar
    frontend's sidecar ─ k8s attestor: a simulated kubelet writes its projected SA token
    reports' sidecar   ─ unix attestor: the broker reads its peer credentials

Then a walkthrough as the legacy clients would do it (plain HTTP to 127.0.0.1), a table of the
outcomes, and exit 0 only when every step behaved as expected. ``--keep-running`` leaves the
topology up; Ctrl-C (or SIGTERM) tears everything down.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from sidecar.demo import topology as topo
from sidecar.demo.kubelet import SimulatedKubelet
from sidecar.demo.report import Report, print_table
from sidecar.demo.supervisor import (
    StartupError,
    Stopped,
    Supervisor,
    install_stop_handlers,
)
from sidecar.demo.tap import WireTap
from sidecar.demo.walkthrough import Walkthrough, describe
from sidecar.local_ports import free_port, port_is_free


def _say(text: str) -> None:
    print(text, flush=True)


def _pick_ports() -> topo.Placement:
    """The defaults where they are free; otherwise the next free port above the default (out
    of the kernel's ephemeral range, where outgoing connections could take it before the
    child binds it), and only then any free port. Says which ones moved."""
    ports: dict[str, dict[str, int]] = {}
    taken: set[int] = set()
    for service, roles in topo.DEFAULT_PORTS.items():
        ports[service] = {}
        for role, default in roles.items():
            port = next(
                (p for p in range(default, default + 50) if p not in taken and port_is_free(p)),
                None,
            )
            while port is None or port in taken:
                port = free_port()
            if port != default:
                _say(f"  port {default} ({service} {role}) is taken: using {port}")
            ports[service][role] = port
            taken.add(port)
    return topo.Placement(ports=ports)


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _envoy() -> str:
    from sidecar.envoy_command import envoy_binary

    try:
        return envoy_binary()
    except FileNotFoundError as exc:
        raise StartupError(str(exc)) from None


class Demo:
    def __init__(self, workdir: Path, token_ttl: int) -> None:
        self.workdir = workdir
        self.token_ttl = token_ttl
        # Unix socket paths are limited to 108 bytes: keep the broker's run dir short.
        self.run_dir = Path(tempfile.mkdtemp(prefix="wis-", dir="/tmp"))
        self.supervisor = Supervisor(workdir)
        self.kubelet: SimulatedKubelet | None = None
        self.tap: WireTap | None = None
        self.placement = topo.Placement()
        self.exe = os.path.realpath(sys.executable)
        self.audit_log = workdir / "broker-audit.jsonl"

    # -- start-up ----------------------------------------------------------------------------

    def start(self) -> None:
        p = self.placement = _pick_ports()
        py = [sys.executable, "-m"]
        steps = 7
        t0 = time.monotonic()

        def progress(n: int, what: str) -> float:
            _say(f"[{n}/{steps}] {what} …")
            return time.monotonic()

        def ready(since: float, where: str) -> None:
            _say(f"      ready in {time.monotonic() - since:.1f}s — {where}")

        t = progress(1, "simulated kubelet: demo cluster key, projected token for shop/frontend")
        self.kubelet = SimulatedKubelet(self.workdir, audience=topo.BROKER_SA_AUDIENCE, ttl=600)
        token_file = self.kubelet.write_token(topo.NAMESPACE, topo.FRONTEND_SA)
        self.kubelet.run_rotation(topo.NAMESPACE, topo.FRONTEND_SA, every=60)
        ready(t, f"token at {token_file}")

        t = progress(2, "broker (issuer, token exchange, unix attestation socket)")
        broker_cfg = _write(
            self.workdir / "broker.yaml",
            topo.broker_config(
                p,
                run_dir=str(self.run_dir),
                cluster_jwks_file=str(self.kubelet.jwks_path),
                unix_selectors={
                    topo.REPORTS_ID: [f"unix:uid:{os.getuid()}", f"unix:path:{self.exe}"]
                },
                token_ttl=self.token_ttl,
                audit_path=str(self.audit_log),
            ),
        )
        self.broker_config = broker_cfg
        broker = self.supervisor.start("broker", [*py, "sidecar", "broker", "-c", str(broker_cfg)])
        self.supervisor.wait_http(broker, f"{topo.issuer(p)}/.well-known/openid-configuration")
        ready(t, topo.issuer(p))

        t = progress(3, "orders: the legacy app (knows nothing about tokens)")
        orders = self.supervisor.start(
            "orders",
            [
                *py,
                "sidecar.apps.echo",
                "--host",
                "127.0.0.1",
                "--port",
                str(p.port("orders", "http")),
                "--name",
                "orders",
            ],
        )
        self.supervisor.wait_http(orders, f"{p.url('orders', 'http')}/__health")
        ready(t, p.url("orders", "http"))

        t = progress(4, "orders' sidecar (ext_authz gRPC, policy, replay and nonce checks)")
        # The tap sits on the wire between frontend's sidecar and Envoy, forwarding verbatim:
        # the place an attacker who can read traffic (but holds no key) would be. Started
        # now so that orders' sidecar can list its origin among the authorities.
        self.tap = WireTap(p.port("envoy", "ingress"))
        tap_port = self.tap.start()
        cfg = _write(
            self.workdir / "orders-sidecar.yaml",
            topo.orders_sidecar_config(p, also_reached_at=(f"http://127.0.0.1:{tap_port}",)),
        )
        sidecar = self.supervisor.start("orders-sidecar", [*py, "sidecar", "run", "-c", str(cfg)])
        self.supervisor.wait_http(sidecar, f"{p.url('orders-sidecar', 'admin')}/readyz")
        ready(t, f"ext_authz on 127.0.0.1:{p.port('orders-sidecar', 'grpc')}")

        t = progress(5, "Envoy in front of orders (ext_authz over gRPC, failure mode closed)")
        from sidecar.envoy_config import dump_yaml

        envoy_cfg = self.workdir / "envoy.yaml"
        envoy_cfg.write_text(dump_yaml(topo.envoy_bootstrap(p)))
        admin = p.port("envoy", "admin")
        envoy = self.supervisor.start(
            "envoy",
            [
                _envoy(),
                "-c",
                str(envoy_cfg),
                "--concurrency",
                "1",
                "--base-id",
                str(admin),
                "--disable-hot-restart",
                "-l",
                "warning",
            ],
        )
        self.supervisor.wait_http(envoy, f"{p.url('envoy', 'admin')}/ready")
        ready(t, p.url("envoy", "ingress"))

        t = progress(6, "frontend's sidecar (k8s attestor; egress through a wire tap)")
        cfg = _write(
            self.workdir / "frontend-sidecar.yaml",
            topo.caller_sidecar_config(
                p,
                "frontend-sidecar",
                topo.k8s_attestor(str(token_file)),
                upstream=f"http://127.0.0.1:{tap_port}",
            ),
        )
        frontend = self.supervisor.start(
            "frontend-sidecar", [*py, "sidecar", "run", "-c", str(cfg)]
        )
        self.supervisor.wait_http(frontend, f"{p.url('frontend-sidecar', 'admin')}/readyz")
        ready(
            t,
            f"egress on 127.0.0.1:{p.port('frontend-sidecar', 'egress')} → tap "
            f"127.0.0.1:{tap_port} → Envoy",
        )

        t = progress(7, "reports' sidecar (unix attestor; a WIMSE listener through the tap)")
        cfg = _write(
            self.workdir / "reports-sidecar.yaml",
            topo.caller_sidecar_config(
                p,
                "reports-sidecar",
                topo.unix_attestor(str(self.run_dir)),
                wimse_upstream=f"http://127.0.0.1:{tap_port}",
            ),
        )
        reports = self.supervisor.start("reports-sidecar", [*py, "sidecar", "run", "-c", str(cfg)])
        self.supervisor.wait_http(reports, f"{p.url('reports-sidecar', 'admin')}/readyz")
        ready(
            t,
            f"egress on 127.0.0.1:{p.port('reports-sidecar', 'egress')} → Envoy; WIMSE "
            f"on 127.0.0.1:{p.port('reports-sidecar', 'wimse')} → tap → Envoy",
        )
        _say(f"topology up in {time.monotonic() - t0:.1f}s; logs and configs in {self.workdir}\n")

    # -- walkthrough -------------------------------------------------------------------------

    def walkthrough(self) -> Report:
        assert self.tap is not None
        walk = Walkthrough(
            placement=self.placement,
            tap=self.tap,
            broker_config=self.broker_config,
            audit_log=self.audit_log,
            token_ttl=self.token_ttl,
            say=_say,
        )
        # Who vouched for whom, as the broker's audit log records it for the tokens the two
        # sidecars hold right now.
        records = {name: walk.vouched(f"{name}-sidecar") for name in ("frontend", "reports")}
        lines = ["who vouched for whom (from the broker's audit log):"]
        for name, record in records.items():
            lines.append(f"  {name:<8} = {record.get('sub', '(no token issued)')}")
            lines.append(f"             {describe(record)}")
        lines += [
            "  Peer credentials cannot tell two processes of one user and one binary apart, so on",
            "  this machine only one workload is told apart that way; frontend's identity comes",
            "  from the (simulated) cluster. In production each workload has its own uid or pod.",
            "",
            "walkthrough (the legacy clients speak plain HTTP to 127.0.0.1 only):",
        ]
        _say("\n".join(lines))
        report = walk.run()
        report.topology = {
            "ports": self.placement.ports,
            "identities": {
                str(r["sub"]): str(r["attestor"]) for r in records.values() if r.get("sub")
            },
            "workdir": str(self.workdir),
            "run_dir": str(self.run_dir),
            "processes": {
                c.name: c.popen.pid for c in self.supervisor.children if c.popen is not None
            },
        }
        return report

    def keep_running(self) -> None:
        p = self.placement
        egress_f = p.port("frontend-sidecar", "egress")
        egress_r = p.port("reports-sidecar", "egress")
        _say(
            "\nThe topology stays up. Try, from another terminal:\n"
            f"  curl -s  http://127.0.0.1:{egress_f}/orders/42     # as frontend: allowed\n"
            f"  curl -si http://127.0.0.1:{egress_r}/orders/42     # as reports: 403\n"
            f"  curl -s  http://127.0.0.1:{p.port('reports-sidecar', 'wimse')}/reports/daily"
            "  # as reports, WIT + WPT: allowed\n"
            f"  curl -si http://127.0.0.1:{p.port('envoy', 'ingress')}/orders/42"
            "     # skipping the sidecar: 401\n"
            f"  curl -s  {p.url('frontend-sidecar', 'admin')}/tokens       # frontend's token "
            "claims (never the token)\n"
            f"  curl -s  {p.url('orders-sidecar', 'admin')}/metrics      # orders' decisions\n"
            f"  {_sidecar_cli()} broker revoke -c {self.broker_config} --sub {topo.FRONTEND_ID}\n"
            f"  {_sidecar_cli()} broker revoke -c {self.broker_config} --sub {topo.FRONTEND_ID}"
            " --restore\n"
            f"logs: {self.workdir}/*.log — Ctrl-C stops everything."
        )
        while True:
            dead = self.supervisor.dead()
            if dead:
                raise StartupError(f"{dead} exited; see {self.workdir}")
            time.sleep(1.0)

    # -- teardown ----------------------------------------------------------------------------

    def stop(self) -> list[str]:
        try:
            if self.tap is not None:
                self.tap.stop()
            if self.kubelet is not None:
                self.kubelet.stop()
        finally:  # whatever happened above, the child processes go
            self.supervisor.stop_all()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.supervisor.survivors()


def _sidecar_cli() -> str:
    """The ``sidecar`` command as the user can paste it (./scripts/demo leaves it in .venv)."""
    beside = Path(sys.executable).parent / "sidecar"
    return str(beside) if beside.is_file() and shutil.which("sidecar") != str(beside) else "sidecar"


def _prepare(args: argparse.Namespace) -> Path:
    """Check what the user gave before starting anything: a bad path is a clear message."""
    if args.report:
        report = Path(args.report)
        if report.is_dir() or not report.parent.is_dir():
            raise StartupError(
                f"--report: expected a file path in an existing directory, got {args.report!r}"
            )
    if args.workdir is None:
        return Path(tempfile.mkdtemp(prefix="sidecar-demo-"))  # 0700
    workdir = Path(args.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise StartupError(f"--workdir: expected a directory, got the file {args.workdir!r}")
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return workdir


def _run(args: argparse.Namespace) -> int:
    # Tokens, keys' public halves, configs and logs: readable by this user only (children
    # inherit the umask). The projected SA token in particular is a credential.
    os.umask(0o077)
    install_stop_handlers()
    try:
        workdir = _prepare(args)
    except StartupError as err:
        _say(f"demo failed: {err}")
        return 2
    demo = Demo(workdir, args.token_ttl)
    code = 1
    report: Report | None = None
    try:
        try:
            demo.start()
            report = demo.walkthrough()
            _say("")
            print_table(report.steps, sys.stdout)
            passed = sum(s.ok for s in report.steps)
            _say(f"{passed} of {len(report.steps)} steps behaved as expected.")
            code = 0 if report.ok else 1
            dead = demo.supervisor.dead()
            if dead:
                _say(f"exited during the walkthrough: {dead}")
            if args.report:
                report.write_json(Path(args.report))
            if args.keep_running:
                demo.keep_running()
        except StartupError as err:
            _say(f"\ndemo failed: {err}")
            code = 2
        except (KeyboardInterrupt, Stopped):
            _say("\nstopping …")
            code = code if report is not None else 130
        except Exception as err:  # a bug or an environment problem: say it, then tear down
            _say(f"\ndemo failed: {type(err).__name__}: {err}")
            code = 2
    finally:
        # Signals during teardown must not leave children behind: ignore them until done.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        survivors = demo.stop()
        if survivors:
            _say(f"WARNING: still running after teardown: {', '.join(survivors)}")
            code = code or 1
        else:
            _say("all demo processes stopped.")
        if code == 0 and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif code != 0:
            _say(f"logs kept in {workdir}")
    return code


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run the one-machine demo: broker, Envoy, three sidecars, and a walkthrough",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the topology up after the walkthrough (Ctrl-C stops it)",
    )
    p.add_argument(
        "--token-ttl",
        type=_ttl,
        default=10,
        metavar="SECONDS",
        help="lifetime of the tokens the broker issues (default 10: short, so a "
        "refresh happens during the walkthrough)",
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="keep configs and logs here (default: a temporary directory, removed "
        "after a green run)",
    )
    p.add_argument(
        "--report",
        default=None,
        metavar="FILE",
        help="also write the outcome of every step as JSON to FILE",
    )
    p.set_defaults(func=_run)


def _ttl(value: str) -> int:
    try:
        ttl = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole seconds, got {value!r}") from None
    # Under 6 s the refresh and revocation steps race the token's own expiry.
    if not 6 <= ttl <= 3600:
        raise argparse.ArgumentTypeError(f"expected 6..3600 seconds, got {ttl}")
    return ttl
