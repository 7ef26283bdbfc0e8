"""The legacy client, run once against a real local HTTP server (in-process, on loopback)."""

from __future__ import annotations

import importlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sidecar.apps import legacy_client
from tests.integration.harness import free_port

FRONTEND = "spiffe://demo.local/ns/shop/sa/frontend"


class _Handler(BaseHTTPRequestHandler):
    """/orders/… answers like the echo app behind Envoy; /denied like an ext_authz denial."""

    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        self.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        if self.path.startswith("/denied"):
            status, headers, body = 403, {"x-authz-reason": "policy_denied"}, b'{"error":"x"}'
        else:
            doc = {"app": "orders", "path": self.path, "headers": {"x-workload-id": FRONTEND}}
            status, headers, body = 200, {}, json.dumps(doc).encode()
        self.send_response(status)
        for name, value in {"content-type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_one_call_prints_status_and_identity(
    server: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy from the environment must not be used: the sidecar is on loopback.
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    client = importlib.reload(legacy_client)  # its opener is built at import: with these
    url = f"{server}/orders/1"
    code = client.main(["--url", url, "--count", "1", "--name", "frontend"])
    assert code == 0
    assert capsys.readouterr().out == f"frontend GET {url} -> 200 app=orders as {FRONTEND}\n"
    (request,) = _Handler.seen
    assert request["path"] == "/orders/1"
    assert "authorization" not in request and "dpop" not in request  # it knows no tokens


def test_a_denial_is_an_answer(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"{server}/denied"
    assert legacy_client.main(["--url", url, "--count", "1", "--name", "reports"]) == 0
    assert capsys.readouterr().out == f"reports GET {url} -> 403 reason=policy_denied\n"


def test_no_answer_fails(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/orders/1"  # nothing listens there
    assert legacy_client.main(["--url", url, "--count", "1", "--timeout", "2"]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"legacy GET {url} -> error: ") and "refused" in out.lower()
