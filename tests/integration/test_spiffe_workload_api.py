"""The ``spiffe`` attestor and Workload API trust bundles against a fake Workload API (grpcio
on a Unix socket, py-spiffe's ``workload.proto``), then end to end through the real Envoy:

    fake Workload API → sidecar A (`spiffe` attestor, egress) → Envoy (ext_authz gRPC)
      → sidecar B (`auth: bearer` route, `authz.trust_domains`) → echo app
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from spiffe import JwtBundle, JwtSvid, TrustDomain
from spiffe._proto import workload_pb2, workload_pb2_grpc

from sidecar.authz.config import parse_authz_config
from sidecar.authz.decision import Allow, Deny, RequestView
from sidecar.authz.service import AuthzService
from sidecar.envoy_config import ingress_bootstrap
from sidecar.errors import Reason
from sidecar.identity.errors import IdentityCode, IdentityError
from sidecar.identity.spiffe_attestor import SpiffeAttestor
from sidecar.identity.workload_api import SOCKET_ENV
from tests.integration.fake_workload_api import HEADER, FakeWorkloadApi
from tests.integration.harness import (
    REPO_ROOT,
    ManagedProcess,
    free_port,
    http_request,
    start_echo_app,
    start_envoy,
    wait_for_http,
)

DOMAIN = "example.org"
FRONTEND = "spiffe://example.org/ns/shop/sa/frontend"
ORDERS = "spiffe://example.org/ns/shop/sa/orders"


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[FakeWorkloadApi, str]]:
    api = FakeWorkloadApi(DOMAIN, FRONTEND)
    uri = api.start(tmp_path / "agent.sock")
    try:
        yield api, uri
    finally:
        api.stop()


def _authz(uri: str) -> AuthzService:
    from prometheus_client import CollectorRegistry

    cfg = parse_authz_config(
        {
            "audience": ORDERS,
            "authorities": ["http://orders.example.org"],
            "trust_domains": [
                {"name": DOMAIN, "workload_api": True, "socket": uri, "min_refresh_interval": 0}
            ],
            "routes": [{"prefix": "/", "auth": "bearer"}],
            "rules": [{"principals": [FRONTEND]}],
            "grpc": {"enabled": False},
            "http": {"enabled": False},
        }
    )
    return AuthzService(cfg, CollectorRegistry())


def _bearer(token: str) -> RequestView:
    return RequestView(
        "GET", "http", "orders.example.org", "/orders", {"authorization": f"Bearer {token}"}
    )


def test_py_spiffe_and_our_ingress_accept_the_same_jwt_svid(fake: Any) -> None:
    api, uri = fake

    async def main() -> tuple[Any, Any]:
        attestor = SpiffeAttestor(uri)
        try:
            issued = await attestor.fetch(ORDERS)
        finally:
            await attestor.close()
        service = _authz(uri)
        await service.bundle_sources[DOMAIN].refresh()
        try:
            return issued, await service.authorizer.decide(_bearer(issued.token))
        finally:
            await service.stop()

    issued, decision = asyncio.run(main())
    assert issued.token_type == "Bearer" and issued.authorization.startswith("Bearer ")
    assert "iss" not in issued.claims
    bundle = JwtBundle.parse(TrustDomain(DOMAIN), json.dumps(api.jwks()).encode())
    svid = JwtSvid.parse_and_validate(issued.token, bundle, {ORDERS})
    assert str(svid.spiffe_id) == FRONTEND
    assert isinstance(decision, Allow), decision
    assert ("x-workload-id", FRONTEND) in decision.headers_to_set


def test_rotation_pushed_on_the_bundle_stream_is_picked_up_on_unknown_kid(fake: Any) -> None:
    api, uri = fake
    with grpc.insecure_channel(uri.replace("unix://", "unix:")) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]
        stream = stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=[(HEADER, "true")])
        first = json.loads(next(stream).bundles[DOMAIN])
        new_kid = api.rotate()
        second = json.loads(next(stream).bundles[DOMAIN])
        stream.cancel()
    assert [k["kid"] for k in first["keys"]] == [f"{DOMAIN}-1"]
    assert [k["kid"] for k in second["keys"]] == [f"{DOMAIN}-1", new_kid]

    async def main() -> Any:
        service = _authz(uri)
        await service.start()  # loads the bundle: both keys
        api.rotate()  # a third key, signing from now on: unknown to us until a refresh
        token = api.sign([ORDERS])
        try:
            return await service.authorizer.decide(_bearer(token))
        finally:
            await service.stop()

    assert isinstance(asyncio.run(main()), Allow)


def test_the_security_header_is_required(fake: Any) -> None:
    _, uri = fake
    with grpc.insecure_channel(uri.replace("unix://", "unix:")) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as err:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=[ORDERS]), timeout=5)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, IdentityCode.ACCESS_DENIED),
        (grpc.StatusCode.UNIMPLEMENTED, IdentityCode.WORKLOAD_API_REFUSED),
    ],
)
def test_refusals_become_identity_errors(
    fake: Any, status: grpc.StatusCode, code: IdentityCode
) -> None:
    api, uri = fake
    api.fail["FetchJWTSVID"] = status

    async def main() -> None:
        attestor = SpiffeAttestor(uri)
        try:
            await attestor.fetch(ORDERS)
        finally:
            await attestor.close()

    with pytest.raises(IdentityError) as err:
        asyncio.run(main())
    assert err.value.code is code and not err.value.retryable
    assert status.name.lower() in err.value.detail  # the gRPC status stays in the detail


def test_spiffe_endpoint_socket_is_honoured(fake: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, uri = fake
    monkeypatch.setenv(SOCKET_ENV, uri)

    async def main() -> Any:
        attestor = SpiffeAttestor(None)
        try:
            return await attestor.fetch(ORDERS)
        finally:
            await attestor.close()

    assert asyncio.run(main()).claims["sub"] == FRONTEND


def test_no_socket_at_all_is_an_identity_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    with pytest.raises(IdentityError, match="SPIFFE_ENDPOINT_SOCKET"):
        asyncio.run(SpiffeAttestor(None).fetch(ORDERS))


def test_forged_cross_domain_svid_is_denied(fake: Any) -> None:
    api, uri = fake

    async def main() -> Any:
        service = _authz(uri)
        await service.bundle_sources[DOMAIN].refresh()
        try:
            forged = api.sign([ORDERS], sub="spiffe://partner.example/ns/shop/sa/frontend")
            return await service.authorizer.decide(_bearer(forged))
        finally:
            await service.stop()

    decision = asyncio.run(main())
    assert isinstance(decision, Deny) and decision.reason is Reason.TRUST_DOMAIN_MISMATCH


# -- end to end ------------------------------------------------------------------------------


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_jwt_svid_from_the_workload_api_through_envoy(fake: Any, tmp_path: Path) -> None:
    api, uri = fake
    a_port, a_admin, b_grpc, b_admin = free_port(), free_port(), free_port(), free_port()
    app_port, envoy_port, envoy_admin = free_port(), free_port(), free_port()
    bundle_file = tmp_path / "example.org.bundle.json"
    bundle_file.write_text(json.dumps(api.spiffe_bundle()))
    a_cfg = _write(
        tmp_path / "a.yaml",
        {
            "identity": {"attestor": {"type": "spiffe"}},
            "egress": {
                "upstreams": [
                    {
                        "name": "orders",
                        "listen": f"127.0.0.1:{a_port}",
                        "upstream": f"http://127.0.0.1:{envoy_port}",
                        "audience": ORDERS,
                    }
                ]
            },
            "admin": {"listen": f"127.0.0.1:{a_admin}"},
        },
    )
    b_cfg = _write(
        tmp_path / "b.yaml",
        {
            "authz": {
                "audience": ORDERS,
                "trust_domains": [{"name": DOMAIN, "bundle_file": str(bundle_file)}],
                "grpc": {"listen": f"127.0.0.1:{b_grpc}"},
                "http": {"enabled": False},
                "routes": [{"prefix": "/orders", "auth": "bearer"}],
                "rules": [{"name": "frontend", "principals": [FRONTEND], "paths": ["/orders"]}],
            },
            "admin": {"listen": f"127.0.0.1:{b_admin}"},
        },
    )
    procs: list[ManagedProcess] = []
    try:
        procs.append(start_echo_app(app_port, tmp_path, name="orders"))
        b = ManagedProcess(
            [sys.executable, "-m", "sidecar", "run", "-c", str(b_cfg)],
            name="sidecar-b",
            log_dir=tmp_path,
            cwd=REPO_ROOT,
        ).start()
        procs.append(b)
        a = ManagedProcess(
            [sys.executable, "-m", "sidecar", "run", "-c", str(a_cfg)],
            name="sidecar-a",
            log_dir=tmp_path,
            cwd=REPO_ROOT,
            env={SOCKET_ENV: uri},
        ).start()
        procs.append(a)
        wait_for_http(f"http://127.0.0.1:{b_admin}/readyz", 20, process=b)
        procs.append(
            start_envoy(
                ingress_bootstrap(
                    listen_port=envoy_port,
                    upstream_port=app_port,
                    admin_port=envoy_admin,
                    mode="grpc",
                    authz_port=b_grpc,
                ),
                tmp_path,
                envoy_admin,
            )
        )
        wait_for_http(f"http://127.0.0.1:{a_admin}/readyz", 20, process=a)
        status, _, body = http_request(f"http://127.0.0.1:{a_port}/orders/1")
        assert status == 200, body
        seen = json.loads(body)["headers"]
        assert seen["x-workload-id"] == FRONTEND
        assert seen["x-workload-auth"] == "bearer"
        assert seen["x-workload-issuer"] == f"spiffe://{DOMAIN}"
        assert "dpop" not in seen  # a JWT-SVID is a bearer token: no proof sent
        assert api.calls.get("FetchJWTSVID", 0) >= 1
        # Sent straight to Envoy without sidecar A: no token, denied.
        status, _, _ = http_request(f"http://127.0.0.1:{envoy_port}/orders/1")
        assert status == 401
    finally:
        for proc in reversed(procs):
            proc.stop()
