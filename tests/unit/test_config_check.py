"""``sidecar check`` / ``--check``: every mistake of a file at once, each with its file, line
and key; duplicate keys refused with both lines; ``--version``; ``--log-level`` after the
command."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.config_files import detect_kind
from sidecar.config_source import load_yaml_file
from sidecar.errors import ConfigErrors

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

THREE_MISTAKES = """\
identity:
  issuer: http://127.0.0.1:8443
  attestor: {type: unix}
  refresh:
    jitter: 2
egress:
  upstreams:
    - listen: nowhere
      upstream: http://127.0.0.1:10000
      audience: spiffe://demo.local/ns/shop/sa/orders
authz:
  audience: spiffe://demo.local/ns/shop/sa/orders
  leeway: soon
  issuers:
    - issuer: https://issuer.example
      jwks_uri: https://issuer.example/k
"""


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _sidecar(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *argv], capture_output=True, text=True, timeout=60
    )


@pytest.mark.integration  # runs the command line as a process
def test_three_mistakes_are_reported_with_file_line_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, THREE_MISTAKES)
    proc = _sidecar("check", "-c", path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line.strip() for line in proc.stderr.splitlines() if path in line]
    assert lines == [
        f"{path}:5: identity.refresh.jitter: expected a number below 1, got 2.0",
        f"{path}:8: egress.upstreams[0].listen: expected host:port, got 'nowhere'",
        f"{path}:13: authz.leeway: expected a duration >= 0s: seconds, or a number with ms, "
        "s, m or h (250ms, 5m), got 'soon'",
    ], proc.stderr
    assert "3 configuration errors" in proc.stderr
    # the same from the command's own --check
    run = _sidecar("run", "-c", path, "--check")
    assert run.returncode == 2 and run.stderr.count(path) == 3, run.stderr


def test_every_unknown_key_is_its_own_mistake(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(
        tmp_path,
        "authz:\n  audience: a\n  isuers: []\n  grpc:\n    listne: x\n    engine: fast\nextra: 1\n",
    )
    assert main(["check", "-c", path, "--kind", "authz"]) == 2
    err = capsys.readouterr().err
    for line, key in (
        (3, "authz.isuers"),
        (5, "authz.grpc.listne"),
        (6, "authz.grpc.engine"),
        (7, "extra"),
    ):
        assert f"{path}:{line}: {key}: expected" in err, err


def test_broker_file_mistakes_are_located(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(
        tmp_path,
        "issuer: http://127.0.0.1:8443\n"
        "tokens:\n  ttl: 2d\n"
        "keys:\n  rotate_every: 1h\n  prepublish: 10m\n  jwks_max_age: 250ms\n"
        "entries:\n  - spiffe_id: spiffe://demo.local/a\n    selectors: [unix:uid:1000]\n"
        "    audiences: [x]\n    tll: 5\n",
    )
    assert main(["check", "-c", path]) == 2  # broker: told by its keys
    err = capsys.readouterr().err
    assert f"{path}:3: tokens.ttl: expected a duration" in err, err
    assert f"{path}:7: keys.jwks_max_age: expected a whole number of seconds" in err, err
    assert f"{path}:12: entries[0].tll: expected one of the known keys" in err, err


def test_duplicate_keys_are_refused_with_both_lines(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "authz:\n  audience: a\n  leeway: 5\n  issuers: []\n  leeway: 1m\n"
        "admin:\n  listen: 127.0.0.1:0\nadmin: {}\n",
    )
    with pytest.raises(ConfigErrors) as info:
        load_yaml_file(path)
    assert [str(e) for e in info.value.errors] == [
        f"{path}:5: authz.leeway: expected each key once (also set at line 3): remove one of "
        "the two",
        f"{path}:8: admin: expected each key once (also set at line 6): remove one of the two",
    ]


@pytest.mark.integration  # runs the command line as a process
def test_yaml_syntax_error_names_the_line_without_quoting_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "authz:\n  nonce:\n    secret: 'do-not-print-me\n  leeway: [\n")
    proc = _sidecar("check", "-c", path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{path}:" in proc.stderr and "valid YAML" in proc.stderr
    assert "do-not-print-me" not in proc.stderr


@pytest.mark.parametrize(
    ("example", "kind", "command"),
    [
        ("sidecar.yaml", "sidecar", "run"),
        ("authz.yaml", "authz", "authz"),
        ("broker.yaml", "broker", "broker"),
    ],
)
def test_examples_check_clean_with_a_summary(
    example: str, kind: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(EXAMPLES / example)
    assert detect_kind(load_yaml_file(path)) == kind
    assert main(["check", "-c", path]) == 0
    assert main([command, "-c", path, "--check"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{path}: valid sidecar {command} configuration: " + out[0].split(": ")[-1]] * 2


def test_kind_can_be_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An authz-only file checked as `sidecar run` would run it: workers must be 1 there.
    path = _write(
        tmp_path,
        "authz:\n  audience: a\n  workers: 2\n  http: {enabled: false}\n  issuers:\n"
        "    - {issuer: https://i.example, jwks_uri: https://i.example/k}\n",
    )
    assert main(["check", "-c", path]) == 0
    assert main(["check", "-c", path, "--kind", "sidecar"]) == 2
    assert "authz.workers: expected 1 under `sidecar run`" in capsys.readouterr().err


def test_unknown_kind_asks_for_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", _write(tmp_path, "nothing: here\n")]) == 2
    assert "--kind" in capsys.readouterr().err


@pytest.mark.integration  # runs the command line as a process
def test_version_is_the_package_version() -> None:
    proc = _sidecar("--version")
    assert proc.returncode == 0
    assert (
        proc.stdout.strip() == f"sidecar {importlib.metadata.version('workload-identity-sidecar')}"
    )


@pytest.mark.integration  # runs the command line as a process
def test_log_level_after_the_command_and_its_choices(tmp_path: Path) -> None:
    path = str(EXAMPLES / "authz.yaml")
    quiet = _sidecar("authz", "-c", path, "--check", "--log-level", "error")
    assert quiet.returncode == 0 and "WARNING" not in quiet.stderr, quiet.stderr
    loud = _sidecar("--log-level", "error", "authz", "-c", path, "--check")
    assert loud.returncode == 0 and "WARNING" not in loud.stderr, loud.stderr
    bad = _sidecar("run", "-c", path, "--log-level", "VERBOSE")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "invalid choice: 'VERBOSE'" in bad.stderr
    helped = _sidecar("run", "--help")
    assert "{DEBUG,INFO,WARNING,ERROR}" in helped.stdout


def test_a_refused_broker_reload_logs_every_mistake_with_its_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    from typing import Any

    from prometheus_client import CollectorRegistry

    from sidecar.broker.config import parse_broker_config
    from sidecar.config_reload import ConfigReloader

    applied: list[object] = []
    path = _write(tmp_path, "issuer: http://127.0.0.1:8443\n")

    async def apply(data: dict[str, Any], sha256: str) -> None:
        applied.append(parse_broker_config(data))  # raises before anything is applied

    reloader = ConfigReloader(path, CollectorRegistry(), apply)
    _write(tmp_path, "issuer: http://127.0.0.1:8443\ntokens: {ttl: soon}\nkeys: {rotat: 1}\n")
    assert asyncio.run(reloader.reload()) is False
    assert applied == []
    assert f"{path}:2: tokens.ttl" in caplog.text, caplog.text
    assert f"{path}:3: keys.rotat" in caplog.text, caplog.text
