"""The broker serving https (``tls`` with a client CA: mutual TLS) as a real process, end to
end with a CA made in the test: the identity client exchanges a service-account token over
https (the broker itself fetching the cluster's keys from an https issuer with ``clusters[].tls``),
and the authorizer verifies the token with keys it discovered over https. Without the CA, or
without a client certificate, the identity client gets no token and says why."""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import shutil
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sidecar.authz.config import parse_authz_config
from sidecar.authz.decision import Allow, RequestView
from sidecar.authz.replay import InMemoryReplayStore
from sidecar.authz.service import AuthzService
from sidecar.identity.config import parse_identity_config
from sidecar.identity.errors import IdentityError
from sidecar.identity.key import generate_signer
from sidecar.identity.schedule import RefreshPolicy
from sidecar.identity.source import TokenSource
from sidecar.tls_rotation import FILE_CHECK_INTERVAL
from sidecar.tls_settings import client_context
from tests.integration.broker_process import (
    TRUST,
    BrokerProcess,
    ClusterIssuer,
    cluster_config,
    k8s_entries,
    python_entries,
)
from tests.integration.harness import http_request
from tests.tls_pki import LocalPKI, make_pki

ORDERS = f"{TRUST}/ns/shop/sa/orders"


@pytest.fixture(scope="module")
def pki(local_pki: LocalPKI) -> LocalPKI:
    return local_pki


@pytest.fixture(scope="module")
def cluster(pki: LocalPKI) -> Iterator[ClusterIssuer]:
    issuer = ClusterIssuer(tls=pki.server_context())
    try:
        yield issuer
    finally:
        issuer.stop()


@pytest.fixture(scope="module")
def broker(
    tmp_path_factory: pytest.TempPathFactory, pki: LocalPKI, cluster: ClusterIssuer
) -> Iterator[BrokerProcess]:
    proc = BrokerProcess(
        tmp_path_factory.mktemp("broker-tls"),
        entries=k8s_entries(cluster.issuer),
        clusters=[{**cluster_config(cluster), "tls": {"ca_file": str(pki.ca_file)}}],
        tls={
            "cert_file": str(pki.server_cert),
            "key_file": str(pki.server_key),
            "client_ca_file": str(pki.ca_file),
        },
    ).start()
    try:
        yield proc
    finally:
        proc.stop()


def mtls(pki: LocalPKI) -> dict[str, str]:
    return {
        "ca_file": str(pki.ca_file),
        "cert_file": str(pki.client_cert),
        "key_file": str(pki.client_key),
    }


def identity(
    broker: BrokerProcess, cluster: ClusterIssuer, tmp: Path, tls: dict[str, str] | None
) -> Any:
    token_file = tmp / "sa-token"
    token_file.write_text(cluster.sa_token())
    return parse_identity_config(
        {
            "issuer": broker.issuer,
            "attestor": {"type": "k8s", "token_file": str(token_file), "timeout": 3},
            **({} if tls is None else {"tls": tls}),
        }
    )


def test_token_issued_over_https_verifies_with_keys_discovered_over_https(
    broker: BrokerProcess, cluster: ClusterIssuer, pki: LocalPKI, tmp_path: Path
) -> None:
    assert broker.issuer.startswith("https://")
    signer = generate_signer()
    cfg = identity(broker, cluster, tmp_path, mtls(pki))

    async def body() -> None:
        attestor = cfg.build_attestor(signer)
        try:
            token = await attestor.fetch(ORDERS)
        finally:
            await attestor.close()
        assert token.is_dpop and token.claims is not None
        assert token.claims["iss"] == broker.issuer
        authz = parse_authz_config(
            {
                "audience": ORDERS,
                "issuers": [{"issuer": broker.issuer, "discovery": True, "tls": mtls(pki)}],
                "grpc": {"enabled": False},
                "http": {"enabled": False},
                "rules": [{"name": "all", "principals": ["**"], "paths": ["/"]}],
            }
        )
        svc = AuthzService(
            authz, CollectorRegistry(), replay=InMemoryReplayStore(100, epoch=time.time() - 60)
        )
        try:
            await svc.start()
            url = "http://orders.local/orders/1"
            proof = signer.proof(method="GET", url=url, now=time.time(), access_token=token.token)
            view = RequestView(
                "GET",
                "http",
                "orders.local",
                "/orders/1",
                {"authorization": f"DPoP {token.token}", "dpop": proof},
            )
            decision = await svc.authorizer.decide(view)
            assert isinstance(decision, Allow), decision
        finally:
            await svc.stop()

    asyncio.run(asyncio.wait_for(body(), 30))


@pytest.mark.parametrize("trust", ["system", "ca_without_client_cert"])
def test_identity_client_that_cannot_trust_or_be_trusted_gets_no_token(
    broker: BrokerProcess,
    cluster: ClusterIssuer,
    pki: LocalPKI,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    trust: str,
) -> None:
    tls = None if trust == "system" else {"ca_file": str(pki.ca_file)}
    cfg = identity(broker, cluster, tmp_path, tls)

    async def body() -> None:
        attestor = cfg.build_attestor(generate_signer())
        with pytest.raises(IdentityError) as info:
            await attestor.fetch(ORDERS)
        assert info.value.code == "unavailable"
        if trust == "system":
            assert "certificate is not trusted" in info.value.detail, info.value.detail
        # The token source: never ready, and the failure is logged with the reason.
        source = TokenSource(attestor, RefreshPolicy(), [ORDERS])
        await source.start()
        try:
            for _ in range(100):
                if "token fetch failed" in caplog.text:
                    break
                await asyncio.sleep(0.05)
            assert not source.readiness()[0]
            assert source.current(ORDERS) is None
        finally:
            await source.close()
            await attestor.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(asyncio.wait_for(body(), 30))
    line = next(r.getMessage() for r in caplog.records if "token fetch failed" in r.getMessage())
    assert "code=unavailable" in line, line
    if trust == "system":
        assert "not trusted" in line, line


def _fetch_jwks(url: str, pki: LocalPKI) -> str:
    """GET the broker's JWKS trusting ``pki``'s CA and presenting its client certificate: the
    status, or the TLS failure's class name."""
    ctx = client_context(str(pki.ca_file), str(pki.client_cert), str(pki.client_key))
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, context=ctx, timeout=5)
    try:
        conn.request("GET", "/jwks.json")
        return str(conn.getresponse().status)
    except (ssl.SSLError, ConnectionError) as exc:
        return type(exc).__name__
    finally:
        conn.close()


def _not_after(path: Path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def _tls_series(proc: BrokerProcess) -> dict[str, float]:
    """The listener block's TLS series on the broker's /metrics: expiry by file, and stale."""
    status, _, body = http_request(f"{proc.admin_url}/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.labels.get("block") != "tls":
                continue
            if sample.name == "sidecar_tls_certificate_expiry_timestamp_seconds":
                out[sample.labels["file"]] = sample.value
            elif sample.name == "sidecar_tls_files_stale":
                out["stale"] = sample.value
    return out


def test_the_listener_takes_a_rotated_certificate_and_client_ca_without_a_restart(
    tmp_path: Path, local_pki: LocalPKI
) -> None:
    """The files are replaced the way a secret volume does (new files renamed over the old):
    within the look interval new connections see only the new PKI, and the process is the
    same one."""
    one, two = local_pki, make_pki(tmp_path / "two", "two", days=2)
    live = tmp_path / "live"
    live.mkdir()

    def install(pki: LocalPKI) -> None:
        for source, name in (
            (pki.server_cert, "server.pem"),
            (pki.server_key, "server.key"),
            (pki.ca_file, "ca.pem"),
        ):
            shutil.copyfile(source, live / f".{name}")
            os.replace(live / f".{name}", live / name)

    install(one)
    proc = BrokerProcess(
        tmp_path,
        name="rotating",
        entries=python_entries(),
        tls={
            "cert_file": str(live / "server.pem"),
            "key_file": str(live / "server.key"),
            "client_ca_file": str(live / "ca.pem"),
        },
    ).start()
    try:
        pid = proc.process.pid
        assert _tls_series(proc) == {
            "cert_file": _not_after(one.server_cert),
            "client_ca_file": _not_after(one.ca_file),
            "stale": 0.0,
        }
        assert _fetch_jwks(proc.issuer, one) == "200"
        assert _fetch_jwks(proc.issuer, two) == "SSLCertVerificationError"
        install(two)
        deadline = time.monotonic() + FILE_CHECK_INTERVAL + 10
        while _fetch_jwks(proc.issuer, two) != "200":
            assert time.monotonic() < deadline, "the new certificate was never served"
            time.sleep(0.5)
        assert _fetch_jwks(proc.issuer, one) == "SSLCertVerificationError"
        assert proc.process.pid == pid and proc.process.is_running()
        assert "tls files changed; new connections use them: block=tls" in proc.process.log_text()
        assert _tls_series(proc) == {
            "cert_file": _not_after(two.server_cert),
            "client_ca_file": _not_after(two.ca_file),
            "stale": 0.0,
        }
    finally:
        proc.stop()
