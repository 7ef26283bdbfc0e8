"""The decision log: one line per check (a deny at INFO, an allow at DEBUG), in text (logfmt)
or JSON, with transport, method, host, path, x-request-id, result, reason and the caller; a
hostile path or header cannot forge a field or a line in either format. Real CheckGuards and the
real transport adapters; the log is read back through the real formatters."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from envoy.service.auth.v3 import external_auth_pb2
from factory import FRONTEND, HOST, INTRUDER, NOW, Harness, make_harness, view
from multidict import CIMultiDict

from sidecar import cli
from sidecar.authz.command import worker_argv
from sidecar.authz.decision import Decision, RequestView
from sidecar.authz.grpc_server import LoopCheckHandler
from sidecar.authz.guard import CheckGuard
from sidecar.authz.http_server import make_http_app
from sidecar.broker.audit import AuditLog
from sidecar.observability.logs import (
    JsonFormatter,
    TextFormatter,
    active_format,
    plain_event,
    setup_logging,
)

REQUEST_ID = "5c14f6e9-b250-45bb-baa4-b62546bea24b"
# Each tries to end the line and start a forged one, or to add a field of its own.
HOSTILE_PATH = "/orders/1 result=allow sub=spiffe://x\n2026-01-01T00:00:00 INFO forged result=allow"
HOSTILE_ID = 'r1" result="allow\r\n{"result":"allow"}'
HOSTILE_HOST = "orders.demo.local\tresult=allow"


@pytest.fixture
def h() -> Harness:
    harness = make_harness()
    harness.authz.clock = lambda: NOW
    return harness


Capture = Callable[[str, int], io.StringIO]


@pytest.fixture
def capture() -> Iterator[Capture]:
    """``capture(fmt, level)``: the ``sidecar.authz`` loggers' lines, formatted as in a
    process started with ``--log-format fmt``."""
    logger = logging.getLogger("sidecar.authz")
    added: list[logging.Handler] = []
    old_level = logger.level

    def start(fmt: str, level: int) -> io.StringIO:
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
        logger.addHandler(handler)
        logger.setLevel(level)
        added.append(handler)
        return out

    yield start
    for handler in added:
        logger.removeHandler(handler)
    logger.setLevel(old_level)


def decide(h: Harness, request: RequestView, transport: str = "grpc") -> Decision:
    guard = CheckGuard(h.authz, None, transport)
    return guard.end(guard.begin(lambda v: v, request))


_FIELD = re.compile(r' ([a-z_]+)=("(?:[^"\\]|\\.)*"|[^ "]+)')


def _unescape(value: str) -> str:
    if not value.startswith('"'):
        return value
    body = value[1:-1]
    return re.sub(
        r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)",
        lambda m: chr(int(m.group(1)[1:], 16)) if len(m.group(1)) > 1 else m.group(1),
        body,
    )


def parse_text(line: str) -> tuple[str, list[tuple[str, str]]]:
    """A text line as a logfmt reader sees it: (logger, [(key, value), …]); the whole line
    must be consumed by ``time level logger message`` and well-formed fields."""
    head = re.match(r"\S+ (INFO|DEBUG) (\S+) decision", line)
    assert head, line
    rest = line[head.end() :]
    fields = [(m.group(1), _unescape(m.group(2))) for m in _FIELD.finditer(rest)]
    assert "".join(m.group(0) for m in _FIELD.finditer(rest)) == rest, f"unparsed: {line!r}"
    return head.group(2), fields


def one_line(out: io.StringIO) -> str:
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# -- what a line says -------------------------------------------------------------------------


def test_a_deny_in_json_has_every_field(h: Harness, capture: Capture) -> None:
    out = capture("json", logging.INFO)
    token = h.token(sub=INTRUDER)
    request = h.dpop_request(token=token, path="/orders/7", headers={"x-request-id": REQUEST_ID})
    request = RequestView(
        request.method,
        request.scheme,
        request.authority,
        "/orders/7?access_token=secret",
        request.headers,
    )
    decide(h, request, "http")
    record = json.loads(one_line(out))
    assert record["logger"] == "sidecar.authz.http"
    assert record["level"] == "INFO" and record["msg"] == "decision"
    assert record["ts"].endswith("Z")
    expected = {
        "result": "deny",
        "transport": "http",
        "method": "GET",
        "host": HOST,
        "path": "/orders/7",  # the query string may carry secrets: never logged
        "request_id": REQUEST_ID,
        "sub": INTRUDER,
    }
    assert {k: record[k] for k in expected} == expected
    assert (record["reason"], record["status"]) == ("policy_denied", 403)
    assert record["detail"]
    assert "secret" not in json.dumps(record)
    assert token not in json.dumps(record)


def test_a_policy_deny_in_text_names_the_caller_and_the_request(
    h: Harness, capture: Capture
) -> None:
    out = capture("text", logging.INFO)
    request = h.dpop_request(
        method="POST", token=h.token(sub=INTRUDER), headers={"x-request-id": REQUEST_ID}
    )
    decide(h, request)
    logger, fields = parse_text(one_line(out))
    assert logger == "sidecar.authz.grpc"
    got = dict(fields)
    assert got["result"] == "deny" and got["reason"] == "policy_denied"
    assert got["status"] == "403"
    assert (got["transport"], got["method"], got["host"], got["path"]) == (
        "grpc",
        "POST",
        HOST,
        "/orders",
    )
    assert got["request_id"] == REQUEST_ID and got["sub"] == INTRUDER
    assert "token_jti" in got and "proof_jti" in got
    assert got["detail"]
    assert [k for k, _ in fields][:3] == ["result", "reason", "status"]


def test_an_allow_is_one_line_at_debug_and_nothing_at_info(h: Harness, capture: Capture) -> None:
    quiet = capture("text", logging.INFO)
    decide(h, h.dpop_request(headers={"x-request-id": REQUEST_ID}))
    assert quiet.getvalue() == ""
    out = capture("json", logging.DEBUG)
    decide(h, h.dpop_request(headers={"x-request-id": REQUEST_ID}))
    record = json.loads(one_line(out))
    assert record["level"] == "DEBUG"
    assert record["result"] == "allow" and "reason" not in record and "detail" not in record
    assert record["sub"] == FRONTEND and record["rule"] == "frontend-orders"
    assert record["request_id"] == REQUEST_ID and record["path"] == "/orders"


def test_a_request_without_x_request_id_has_no_such_field(h: Harness, capture: Capture) -> None:
    out = capture("json", logging.INFO)
    decide(h, view(headers={}))
    record = json.loads(one_line(out))
    assert record["result"] == "deny" and "request_id" not in record


def test_a_view_that_cannot_be_built_still_logs_one_deny(h: Harness, capture: Capture) -> None:
    out = capture("json", logging.INFO)
    guard = CheckGuard(h.authz, None, "grpc")

    def broken(_: object) -> RequestView:
        raise ValueError("no view")

    decision = guard.end(guard.begin(broken, None))
    assert decision.reason is not None and decision.reason.value == "internal_error"
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    # The failure itself (with its traceback, one JSON line), then the decision.
    assert [r["msg"] for r in lines] == ["ext_authz grpc check failed; denying", "decision"]
    assert "ValueError" in lines[0]["exc"]
    assert lines[1]["reason"] == "internal_error" and "path" not in lines[1]


# -- forging ----------------------------------------------------------------------------------


def _hostile(h: Harness) -> RequestView:
    return view(
        path=HOSTILE_PATH,
        authority=HOSTILE_HOST,
        headers={"x-request-id": HOSTILE_ID, "authorization": "DPoP x"},
    )


def test_hostile_values_cannot_forge_a_text_field_or_line(h: Harness, capture: Capture) -> None:
    out = capture("text", logging.INFO)
    decide(h, _hostile(h))
    line = one_line(out)
    assert all(0x20 <= ord(c) < 0x7F for c in line), line
    _, fields = parse_text(line)
    keys = [k for k, _ in fields]
    assert keys.count("result") == 1 and keys.count("sub") == 0, fields
    got = dict(fields)
    assert got["result"] == "deny"
    assert got["path"] == HOSTILE_PATH
    assert got["request_id"] == HOSTILE_ID
    assert got["host"] == HOSTILE_HOST


def test_hostile_values_cannot_forge_a_json_field_or_line(h: Harness, capture: Capture) -> None:
    out = capture("json", logging.INFO)
    decide(h, _hostile(h))
    line = one_line(out)
    assert line.isascii()
    record = json.loads(line)
    assert record["result"] == "deny" and "sub" not in record
    assert (record["path"], record["request_id"], record["host"]) == (
        HOSTILE_PATH,
        HOSTILE_ID,
        HOSTILE_HOST,
    )


def test_long_values_are_cut_in_both_formats(h: Harness, capture: Capture) -> None:
    text, js = capture("text", logging.INFO), capture("json", logging.INFO)
    decide(h, view(headers={"x-request-id": "r" * 5000}))
    assert len(one_line(text)) < 2000
    assert json.loads(one_line(js))["request_id"] == "r" * 256 + "..."


# -- each transport, through its real adapter ------------------------------------------------


def test_grpc_and_http_decisions_go_to_their_own_loggers(h: Harness, capture: Capture) -> None:
    out = capture("json", logging.INFO)
    handler = LoopCheckHandler(CheckGuard(h.authz, None, "grpc"), "https")
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "GET", "/orders/1?q=1", HOST
    http.headers.update({"x-request-id": "grpc-1", ":authority": HOST})
    raw = handler(req.SerializeToString())
    assert isinstance(raw, bytes)

    app = make_http_app(CheckGuard(h.authz, None, "http"), path_prefix="/authz")
    headers = CIMultiDict([("Host", HOST), ("X-Request-Id", "http-1")])
    request = make_mocked_request("DELETE", "/authz/pay/2?x=1", headers=headers)

    async def call() -> web.StreamResponse:
        match = await app.router.resolve(request)
        return await match.handler(request)

    assert asyncio.run(call()).status == 401
    grpc_line, http_line = (json.loads(line) for line in out.getvalue().splitlines())
    assert (grpc_line["logger"], grpc_line["transport"]) == ("sidecar.authz.grpc", "grpc")
    assert (grpc_line["request_id"], grpc_line["path"]) == ("grpc-1", "/orders/1")
    assert (http_line["logger"], http_line["transport"]) == ("sidecar.authz.http", "http")
    assert (http_line["request_id"], http_line["method"], http_line["path"]) == (
        "http-1",
        "DELETE",
        "/pay/2",
    )


# -- the process: --log-format, SIDECAR_LOG_FORMAT, workers, the ready line, the audit log ---


@pytest.fixture
def root_logging() -> Iterator[None]:
    """setup_logging replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level, fmt = root.handlers[:], root.level, active_format()
    yield
    setup_logging(logging.getLevelName(level), fmt)
    root.handlers[:] = handlers


def test_log_format_flag_and_env(root_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    args = cli.build_parser().parse_args(["--log-format", "json", "envoy-config", "--mode", "grpc"])
    setup_logging(args.log_level, args.log_format)
    assert isinstance(logging.getLogger().handlers[0].formatter, JsonFormatter)
    monkeypatch.setenv("SIDECAR_LOG_FORMAT", "json")
    setup_logging()
    assert active_format() == "json"
    setup_logging(None, "text")  # the flag wins over the environment
    assert isinstance(logging.getLogger().handlers[0].formatter, TextFormatter)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--log-format", "xml", "envoy-config", "--mode", "grpc"])


def test_a_bad_log_format_in_the_environment_is_a_configuration_error(
    root_logging: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SIDECAR_LOG_FORMAT", "xml")
    assert cli.main(["envoy-config", "--mode", "grpc"]) == 2
    err = capsys.readouterr().err
    assert "SIDECAR_LOG_FORMAT" in err and "xml" in err and "json" in err and "Traceback" not in err


def test_workers_are_started_with_the_parents_log_format(root_logging: None) -> None:
    setup_logging(None, "json")
    argv = worker_argv("authz.yaml", None)
    assert argv[:3] == [sys.executable, "-m", "sidecar"]
    args = cli.build_parser().parse_args([*argv[3:], "--worker"])
    assert args.log_format == "json"


def test_the_ready_line_follows_the_format(root_logging: None) -> None:
    setup_logging(None, "text")
    assert (
        plain_event("authz ready", {"grpc": "127.0.0.1:9191"}) == "authz ready grpc=127.0.0.1:9191"
    )
    setup_logging(None, "json")
    record = json.loads(plain_event("authz ready", {"grpc": "127.0.0.1:9191", "admin": 15020}))
    assert (record["msg"], record["grpc"], record["admin"]) == (
        "authz ready",
        "127.0.0.1:9191",
        15020,
    )


def test_the_audit_log_has_its_own_stream_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    audit = AuditLog(None)
    audit.emit("issuance", NOW, result="ok", sub=FRONTEND)
    audit.close()
    captured = capsys.readouterr()
    assert captured.err == ""
    record = json.loads(captured.out)
    assert (record["event"], record["sub"]) == ("issuance", FRONTEND)
