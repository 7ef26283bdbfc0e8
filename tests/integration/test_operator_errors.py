"""An operator's mistake ends in one line naming the setting and the fix, exit code 2, and no
traceback (issue 11.3): a port in use, two listeners on one address, an admin port on an egress
port, a unix socket path that cannot be created, a bad ``--log-level``, an unreadable file.
Each case runs the real ``sidecar`` command in its own process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.harness import free_port

FRONTEND = "spiffe://demo.local/ns/shop/sa/frontend"
# Under load a start can take seconds; a case that does not exit in time is a failure.
TIMEOUT = 60.0


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another process-like listener holds for the whole test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield int(sock.getsockname()[1])


def _authz(tmp: Path, **changes: Any) -> dict[str, Any]:
    jwks = tmp / "jwks.json"
    jwks.write_text(json.dumps({"keys": []}))
    authz: dict[str, Any] = {
        "audience": "spiffe://demo.local/ns/shop/sa/orders",
        "authorities": ["http://orders.local"],
        "issuers": [{"issuer": "http://127.0.0.1:1", "jwks_file": str(jwks)}],
        "grpc": {"listen": f"127.0.0.1:{free_port()}"},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "rules": [{"principals": [FRONTEND], "paths": ["/orders"]}],
    }
    data = {"authz": authz, "admin": {"listen": f"127.0.0.1:{free_port()}"}}
    for dotted, value in changes.items():
        node: Any = data
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    return data


def _run(tmp: Path, upstream_listens: list[str], admin: str) -> dict[str, Any]:
    upstreams = [
        {
            "name": f"u{i}",
            "listen": listen,
            "upstream": f"http://127.0.0.1:{10000 + i}",
            "audience": f"spiffe://demo.local/ns/shop/sa/u{i}",
        }
        for i, listen in enumerate(upstream_listens)
    ]
    return {
        "identity": {
            "issuer": "http://127.0.0.1:1",
            "attestor": {"type": "unix", "socket": str(tmp / "no-broker.sock")},
        },
        "egress": {"upstreams": upstreams},
        "admin": {"listen": admin},
    }


def _broker(tmp: Path, listen: str, admin: str, **extra: Any) -> dict[str, Any]:
    run_dir = tmp / "broker"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    return {
        "issuer": f"http://{listen}",
        "listen": listen,
        "attestation": {"socket": str(run_dir / "attestation.sock")},
        "admin": {"listen": admin},
        "entries": [
            {
                "spiffe_id": FRONTEND,
                "selectors": [f"unix:uid:{os.getuid()}"],
                "audiences": ["spiffe://demo.local/ns/shop/sa/orders"],
            }
        ],
        **extra,
    }


def _port(data: dict[str, Any], *path: str) -> str:
    node: Any = data
    for part in path:
        node = node[part]
    return str(node)


#: Stands for the config file's path: the line names the file as well as the key.
CONFIG = "{config}"

# Each case: (command and config built from tmp_path and a busy port) -> what stderr must name.
Case = Callable[[Path, int], tuple[list[str], dict[str, Any] | None]]


def _authz_port_in_use(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    return ["authz"], _authz(tmp, authz__grpc={"listen": f"127.0.0.1:{busy}"})


def _authz_http_on_grpc(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    data = _authz(tmp)
    data["authz"]["http"]["listen"] = data["authz"]["grpc"]["listen"]
    return ["authz"], data


def _authz_admin_on_http(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    data = _authz(tmp)
    data["admin"]["listen"] = data["authz"]["http"]["listen"]
    return ["authz"], data


def _authz_admin_in_use(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    return ["authz"], _authz(tmp, admin__listen=f"127.0.0.1:{busy}")


def _authz_worker_port_in_use(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    # Two workers bind port and port + 1: the second is taken.
    data = _authz(tmp, authz__grpc={"listen": f"127.0.0.1:{busy - 1}"})
    data["authz"]["workers"] = 2
    return ["authz"], data


def _authz_socket_dir_missing(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    return ["authz"], _authz(tmp, authz__http={"listen": f"unix:{tmp}/missing/authz.sock"})


def _authz_socket_path_is_a_file(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    (tmp / "a-file").write_text("not a socket")
    return ["authz"], _authz(tmp, authz__grpc={"listen": f"unix:{tmp}/a-file"})


def _run_two_upstreams_one_listen(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    listen = f"127.0.0.1:{free_port()}"
    return ["run"], _run(tmp, [listen, listen], f"127.0.0.1:{free_port()}")


def _run_admin_on_egress_port(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    listen = f"127.0.0.1:{free_port()}"
    return ["run"], _run(tmp, [listen], listen)


def _run_wildcard_overlaps(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    port = free_port()
    return ["run"], _run(tmp, [f"127.0.0.1:{port}", f"0.0.0.0:{port}"], "127.0.0.1:0")


def _run_egress_port_in_use(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    return ["run"], _run(tmp, [f"127.0.0.1:{busy}"], f"127.0.0.1:{free_port()}")


def _run_authz_on_egress(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    data = _run(tmp, [f"127.0.0.1:{free_port()}"], f"127.0.0.1:{free_port()}")
    data["authz"] = _authz(tmp)["authz"]
    data["authz"]["grpc"]["listen"] = data["egress"]["upstreams"][0]["listen"]
    return ["run"], data


def _run_public_jwk_unwritable(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    data = _run(tmp, [f"127.0.0.1:{free_port()}"], f"127.0.0.1:{free_port()}")
    data["identity"]["public_jwk_file"] = str(tmp / "missing" / "dpop.jwk.json")
    return ["run"], data


def _broker_listen_in_use(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    return ["broker"], _broker(tmp, f"127.0.0.1:{busy}", f"127.0.0.1:{free_port()}")


def _broker_admin_on_listen(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    listen = f"127.0.0.1:{free_port()}"
    return ["broker"], _broker(tmp, listen, listen)


def _broker_audit_unwritable(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    audit = {"path": str(tmp / "missing" / "audit.log")}
    port = f"127.0.0.1:{free_port()}"
    return ["broker"], _broker(tmp, port, f"127.0.0.1:{free_port()}", audit=audit)


def _not_an_address(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    # 192.0.2.0/24 is TEST-NET-1: never an address of this machine.
    return ["authz"], _authz(tmp, authz__http={"listen": "192.0.2.1:9192"})


def _log_level_verbose(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    return ["--log-level", "VERBOSE", "authz"], _authz(tmp)


def _missing_config_file(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    return ["authz", "-c", str(tmp / "nowhere.yaml")], None


def _unknown_flag(tmp: Path, busy: int) -> tuple[list[str], dict[str, Any] | None]:
    return ["authz", "--listen", "127.0.0.1:1"], _authz(tmp)


CASES: list[tuple[str, Case, list[str]]] = [
    ("authz-port-in-use", _authz_port_in_use, ["authz.grpc.listen", "in use", CONFIG]),
    ("authz-http-on-grpc", _authz_http_on_grpc, ["authz.http.listen", "authz.grpc.listen", CONFIG]),
    ("authz-admin-on-http", _authz_admin_on_http, ["admin.listen", "authz.http.listen", CONFIG]),
    ("authz-admin-in-use", _authz_admin_in_use, ["admin.listen", "in use", CONFIG]),
    (
        "authz-worker-port-in-use",
        _authz_worker_port_in_use,
        ["authz.grpc.listen", "in use", CONFIG],
    ),
    (
        "authz-socket-dir-missing",
        _authz_socket_dir_missing,
        ["authz.http.listen", "create", CONFIG],
    ),
    (
        "authz-socket-is-a-file",
        _authz_socket_path_is_a_file,
        ["authz.grpc.listen", "remove", CONFIG],
    ),
    ("authz-not-local", _not_an_address, ["authz.http.listen", "not one", CONFIG]),
    ("run-two-upstreams", _run_two_upstreams_one_listen, ["egress.upstreams[1].listen", CONFIG]),
    (
        "run-admin-on-egress",
        _run_admin_on_egress_port,
        ["admin.listen", "egress.upstreams[0]", CONFIG],
    ),
    ("run-wildcard-overlap", _run_wildcard_overlaps, ["egress.upstreams[1].listen", CONFIG]),
    (
        "run-egress-in-use",
        _run_egress_port_in_use,
        ["egress.upstreams[0].listen", "in use", CONFIG],
    ),
    (
        "run-authz-on-egress",
        _run_authz_on_egress,
        ["authz.grpc.listen", "egress.upstreams[0]", CONFIG],
    ),
    (
        "run-public-jwk-unwritable",
        _run_public_jwk_unwritable,
        ["identity.public_jwk_file", "write", CONFIG],
    ),
    ("broker-listen-in-use", _broker_listen_in_use, ["listen", "in use", CONFIG]),
    ("broker-admin-on-listen", _broker_admin_on_listen, ["admin.listen", "(listen is", CONFIG]),
    ("broker-audit-unwritable", _broker_audit_unwritable, ["audit.path", "append", CONFIG]),
    ("log-level", _log_level_verbose, ["--log-level", "VERBOSE", "DEBUG"]),
    ("config-missing", _missing_config_file, ["config file", "nowhere.yaml"]),
    ("unknown-flag", _unknown_flag, ["--listen"]),
]


def _sidecar(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        check=False,
    )


@pytest.mark.parametrize(("make", "named"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_operator_mistake_is_one_line_and_exit_2(
    tmp_path: Path, busy_port: int, make: Case, named: list[str]
) -> None:
    argv, data = make(tmp_path, busy_port)
    if data is not None:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(data))
        argv = [*argv, "-c", str(config)]
    done = _sidecar(argv, {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR")})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    for text in named:
        assert text.replace(CONFIG, str(tmp_path / "config.yaml")) in last, done.stderr


def test_bad_log_level_from_the_environment_is_named(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_authz(tmp_path)))
    done = _sidecar(["authz", "-c", str(config)], {**os.environ, "SIDECAR_LOG_LEVEL": "LOUD"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "SIDECAR_LOG_LEVEL" in done.stderr and "LOUD" in done.stderr
