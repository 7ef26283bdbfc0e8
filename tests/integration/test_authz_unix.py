"""Envoy ↔ authorizer over unix sockets (Envoy ``pipe`` addresses), gRPC and HTTP: the
sockets are mode 0600, decisions go through as over TCP, and the sockets are gone at exit."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sidecar.envoy_config import ingress_bootstrap
from tests.integration.harness import (
    ManagedProcess,
    free_port,
    http_request,
    start_echo_app,
    start_envoy,
    wait_for_http,
)
from tests.integration.issuer import AUDIENCE, FRONTEND, DevIssuer, client_signer


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 107-byte limit of a socket path.
    path = Path(tempfile.mkdtemp(prefix="wis-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_envoy_reaches_authz_over_unix_socket(mode: str, tmp_path: Path, sock_dir: Path) -> None:
    issuer = DevIssuer()
    grpc_sock, http_sock = sock_dir / "grpc.sock", sock_dir / "http.sock"
    admin_port, app_port, envoy_port, envoy_admin = (free_port() for _ in range(4))
    cfg = {
        "authz": {
            "audience": AUDIENCE,
            "issuers": [
                {"issuer": issuer.issuer, "jwks_file": str(issuer.write_jwks(tmp_path / "j"))}
            ],
            "grpc": {"listen": f"unix:{grpc_sock}"},
            "http": {"listen": f"unix:{http_sock}"},
            "rules": [{"name": "all", "principals": [FRONTEND], "paths": ["/"]}],
        },
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
    }
    (tmp_path / "authz.yaml").write_text(yaml.safe_dump(cfg))
    app = start_echo_app(app_port, tmp_path, name=f"unix-{mode}")
    authz = ManagedProcess(
        [sys.executable, "-m", "sidecar", "authz", "-c", str(tmp_path / "authz.yaml")],
        name=f"authz-unix-{mode}",
        log_dir=tmp_path,
    ).start()
    envoy = None
    try:
        wait_for_http(f"http://127.0.0.1:{admin_port}/readyz", 20, process=authz)
        for sock in (grpc_sock, http_sock):
            mode_bits = os.stat(sock).st_mode
            assert stat.S_ISSOCK(mode_bits) and stat.S_IMODE(mode_bits) == 0o600, oct(mode_bits)
        envoy = start_envoy(
            ingress_bootstrap(
                listen_port=envoy_port,
                upstream_port=app_port,
                admin_port=envoy_admin,
                mode=mode,  # type: ignore[arg-type]
                authz_unix=str(grpc_sock if mode == "grpc" else http_sock),
            ),
            tmp_path,
            envoy_admin,
        )
        signer = client_signer()
        token = issuer.token(jkt=signer.thumbprint)
        url = f"http://127.0.0.1:{envoy_port}/orders/1"
        proof = signer.proof(method="GET", url=url, now=time.time(), access_token=token)
        headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
        status, _, body = http_request(url, headers=headers)
        assert status == 200, body
        assert json.loads(body)["headers"]["x-workload-id"] == FRONTEND
        status, hdrs, _ = http_request(url, headers=headers)
        assert (status, hdrs.get("x-authz-reason")) == (401, "replayed")
        status, hdrs, _ = http_request(url, headers={"Authorization": "Bearer nope"})
        assert status == 401, hdrs
    finally:
        for proc in (envoy, authz, app):
            if proc is not None:
                proc.stop()
    assert authz.returncode == 0, authz.log_text(tail=2000)
    assert not grpc_sock.exists() and not http_sock.exists(), "sockets left behind"
