"""``sidecar demo`` as a user runs it: a real subprocess starting the real broker, Envoy and
sidecars. The tests read its exit code and JSON report, then check that every process it started
is gone and every port it used is free again."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sidecar.demo.topology import DEFAULT_PORTS, FRONTEND_ID, REPORTS_ID
from sidecar.local_ports import port_is_free
from tests.integration.harness import REPO_ROOT

EXPECTED_STEPS: list[tuple[str, dict[str, Any]]] = [
    (
        "frontend calls orders",
        {"status": 200, "x-workload-id": FRONTEND_ID, "leaked": [], "attestor": "k8s"},
    ),
    ("replays that exact request", {"status": 401, "reason": "replayed"}),
    ("to GET /orders/43", {"status": 401, "reason": "htu_mismatch"}),
    (
        "reports calls orders",
        {"status": 403, "reason": "policy_denied", "sub": REPORTS_ID, "attestor": "unix"},
    ),
    ("calls Envoy directly", {"status": 401, "reason": "missing_credentials"}),
    ("demands a DPoP nonce", {"status": 200, "nonce_retries": 1.0}),
    ("token is refreshed", {}),
    ("revokes frontend", {"denied": 401, "reason": "revoked", "restored": 200}),
    (
        "WIMSE route",
        {"status": 200, "x-workload-id": REPORTS_ID, "auth": "wimse", "leaked": []},
    ),
    ("replays that WIMSE request", {"status": 401, "reason": "replayed"}),
]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes but still answers kill(0): look at its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _assert_all_gone(report: dict[str, Any]) -> None:
    processes = report["processes"]
    assert set(processes) == {
        "broker",
        "orders",
        "orders-sidecar",
        "envoy",
        "frontend-sidecar",
        "reports-sidecar",
    }
    survivors = {name: pid for name, pid in processes.items() if _alive(pid)}
    assert not survivors, f"demo children still running: {survivors}"
    busy = [
        (service, role, port)
        for service, roles in report["ports"].items()
        for role, port in roles.items()
        if not port_is_free(port)
    ]
    assert not busy, f"ports still bound after the demo: {busy}"
    assert not Path(report["run_dir"]).exists(), "the broker's run directory was left behind"


def _assert_walkthrough(report: dict[str, Any]) -> None:
    steps = report["steps"]
    assert [s["number"] for s in steps] == list(range(1, len(EXPECTED_STEPS) + 1))
    for step, (title_part, details) in zip(steps, EXPECTED_STEPS, strict=True):
        assert title_part in step["title"], step
        assert step["ok"] is True, step
        for key, value in details.items():
            assert step["details"][key] == value, (step["title"], key, step["details"])
    refresh = steps[6]["details"]
    assert refresh["calls"] == refresh["ok_calls"] > 0
    # Distinct tokens seen on the wire, none missing.
    assert len(refresh["jtis"]) >= 2 and all(refresh["jtis"])
    assert len(set(refresh["jtis"])) == len(refresh["jtis"])
    assert report["identities"] == {FRONTEND_ID: "k8s", REPORTS_ID: "unix"}
    assert report["ok"] is True


def test_demo_walkthrough_passes_and_leaves_nothing_behind(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--report", str(report_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads(report_path.read_text())
    _assert_walkthrough(report)
    # The table the user reads says the same as the report.
    assert "10 of 10 steps behaved as expected." in proc.stdout
    assert proc.stdout.count("PASS") == 10 and "FAIL" not in proc.stdout
    assert f"frontend = {FRONTEND_ID}" in proc.stdout and f"reports  = {REPORTS_ID}" in proc.stdout
    assert "k8s attestor: service account shop/frontend" in proc.stdout
    assert f"unix attestor: uid {os.getuid()}" in proc.stdout
    assert "all demo processes stopped." in proc.stdout
    _assert_all_gone(report)
    # A green run cleans up its temporary directory.
    assert not Path(report["workdir"]).exists()


@contextmanager
def _occupied(port: int) -> Iterator[bool]:
    """Hold ``port`` (if it is free) so the demo must pick another one."""
    s = socket.socket()
    # As a server would: SO_REUSEADDR, so TIME_WAIT leftovers of the previous test do not
    # make this bind fail.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        s.listen()
        held = True
    except OSError:
        held = False  # already taken by something else: the demo must still avoid it
    try:
        yield held
    finally:
        s.close()


def test_keep_running_takes_free_ports_and_ctrl_c_tears_down(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    workdir = tmp_path / "work"
    broker_default = DEFAULT_PORTS["broker"]["http"]
    egress_default = DEFAULT_PORTS["frontend-sidecar"]["egress"]
    with _occupied(broker_default) as held_b, _occupied(egress_default) as held_e:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar",
                "demo",
                "--keep-running",
                "--report",
                str(report_path),
                "--workdir",
                str(workdir),
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 100
            while not report_path.exists() and time.monotonic() < deadline:
                assert proc.poll() is None, proc.communicate()[0][-4000:]
                time.sleep(0.2)
            assert report_path.exists(), "the demo never finished its walkthrough"
            time.sleep(0.5)  # let it print the curl commands and settle into waiting
            report = json.loads(report_path.read_text())
            assert proc.poll() is None, "--keep-running exited on its own"
            ports = report["ports"]
            # Whether this test or something else holds them, the defaults were not free.
            assert ports["broker"]["http"] != broker_default, held_b
            assert ports["frontend-sidecar"]["egress"] != egress_default, held_e
            # Still serving: the curl line it printed works as the user would paste it.
            with socket.create_connection(("127.0.0.1", ports["envoy"]["ingress"]), 5):
                pass
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # its teardown, then the hard way
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    assert proc.returncode == 0, out[-4000:]
    assert f"is taken: using {ports['broker']['http']}" in out
    assert f"curl -s  http://127.0.0.1:{ports['frontend-sidecar']['egress']}/orders/42" in out
    assert "stopping" in out and "all demo processes stopped." in out
    _assert_walkthrough(report)
    _assert_all_gone(report)
    # --workdir is the user's: configs and logs stay for inspection.
    assert (workdir / "broker.yaml").is_file() and (workdir / "envoy.log").is_file()


def test_children_die_with_a_killed_demo(tmp_path: Path) -> None:
    """SIGKILL leaves the demo no chance to tear down: its children must still go."""
    report_path = tmp_path / "report.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "demo",
            "--keep-running",
            "--report",
            str(report_path),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 100
        while not report_path.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, "the demo exited before its walkthrough ended"
            time.sleep(0.2)
        report = json.loads(report_path.read_text())
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if not any(_alive(pid) for pid in report["processes"].values()):
            break
        time.sleep(0.1)
    shutil.rmtree(report["run_dir"], ignore_errors=True)  # nobody was left to remove it
    _assert_all_gone(report)


def test_ctrl_c_during_start_up_stops_what_was_started(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "demo", "--workdir", str(workdir)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[4/7]"):  # broker and orders are up, orders' sidecar starting
                break
        assert seen and seen[-1].startswith("[4/7]"), "".join(seen)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    out = "".join(seen) + rest
    assert proc.returncode == 130, out
    assert "stopping" in out and "all demo processes stopped." in out, out
    # The children it had started: their logs name them; none may still be running.
    started = sorted(p.stem for p in workdir.glob("*.log"))
    assert "broker" in started and "orders" in started, started
    mine = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert mine.stdout.strip() == "", f"still running: {mine.stdout}"
    ports = {int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)", out)}
    assert ports, out
    assert all(port_is_free(port) for port in ports), f"still bound: {ports}"


def test_bad_arguments_are_a_clear_message(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--workdir", str(not_a_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert "--workdir: expected a directory" in proc.stdout and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--token-ttl", "2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2 and "expected 6..3600 seconds" in proc.stderr
