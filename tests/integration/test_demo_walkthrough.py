"""The walkthrough's judgement can fail: against a stand-in for a broken deployment that lets
everything through (and a broker audit log with no issuance), every security step is a FAIL."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sidecar.demo.report import Step
from sidecar.demo.tap import Captured
from sidecar.demo.topology import DEFAULT_PORTS, FRONTEND_ID, Placement
from sidecar.demo.walkthrough import Walkthrough


class _AllowEverything(BaseHTTPRequestHandler):
    """Answers every request 200 as if orders saw frontend — what a fail-open proxy would do."""

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        if self.path == "/tokens":
            body: dict[str, Any] = {"audiences": [{"claims": {"jti": "same-token-forever"}}]}
        else:
            body = {
                "app": "orders",
                "headers": {"x-workload-id": FRONTEND_ID},
                "body_bytes": length,
            }
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


class _Tap:
    def __init__(self) -> None:
        self.last = Captured("GET", "/orders/42", {"Host": "127.0.0.1", "Authorization": "x"})


@pytest.fixture
def walk(tmp_path: Path) -> Iterator[Walkthrough]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AllowEverything)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ports = {name: {role: port for role in roles} for name, roles in DEFAULT_PORTS.items()}
    try:
        yield Walkthrough(
            placement=Placement(ports=ports),
            tap=_Tap(),  # type: ignore[arg-type]
            broker_config=tmp_path / "broker.yaml",
            audit_log=tmp_path / "audit.jsonl",  # empty: the broker issued nothing
            token_ttl=1,
            say=lambda _text: None,
        )
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "method",
    ["allowed", "replayed", "other_url", "forbidden", "no_credentials", "nonce", "refresh"],
)
def test_a_fail_open_deployment_fails_every_step(walk: Walkthrough, method: str) -> None:
    step = Step(1, method, "")
    walk._run(step, getattr(walk, method))
    assert step.ok is False, step
    assert step.observed and step.observed != "not run"


def test_a_step_that_raises_is_a_fail_row(walk: Walkthrough) -> None:
    # `sidecar broker revoke` against a broker config that does not exist fails: FAIL, no crash.
    step = Step(8, "revocation", "")
    walk._run(step, walk.revocation)
    assert step.ok is False and step.observed.startswith("error:"), step
