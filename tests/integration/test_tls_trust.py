"""TLS trust of every outbound fetch against real local https servers whose certificates come
from a CA made in the test (tests/tls_pki.py): the authorizer's OIDC discovery and JWKS, a
trust domain's bundle endpoint and the revocation list; the egress proxy's https upstreams.
With the test CA configured the fetches succeed; without it they fail closed. A server that
requires a client certificate gets ours when ``cert_file``/``key_file`` are set.
(The broker serving https, and the identity client trusting it, are in test_broker_tls.py.)"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.authz.config import parse_authz_config
from sidecar.authz.decision import Allow, Deny
from sidecar.authz.replay import InMemoryReplayStore
from sidecar.authz.service import AuthzService
from sidecar.config_util import parse_tls_server
from sidecar.egress.config import parse_egress_config
from sidecar.egress.proxy import EgressProxy
from sidecar.identity.attestors import K8sAttestor
from sidecar.identity.key import generate_signer
from sidecar.identity.metrics import IdentityMetrics
from sidecar.identity.schedule import RefreshPolicy
from sidecar.identity.source import TokenSource
from sidecar.net_limits import ConnLimits, GuardedSite, ListenerGuard, server_options
from sidecar.tls_settings import client_context
from tests.integration.issuer import AUDIENCE, DevIssuer
from tests.integration.test_egress_attestors import ORDERS, MiniIssuer
from tests.integration.test_jwks_refresh import _view
from tests.tls_pki import LocalPKI

TRUST_DOMAIN = "example.org"


@pytest.fixture(scope="module")
def pki(local_pki: LocalPKI) -> LocalPKI:
    return local_pki


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 30))


class HttpsServer:
    """Discovery, JWKS, a SPIFFE bundle, a revocation list and an echo, over https only.
    Records the common name of each client certificate it was shown."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.port = 0
        self.issuer: DevIssuer | None = None
        self.client_names: list[str] = []
        self.hits: list[str] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _seen(self, request: web.Request) -> None:
        self.hits.append(request.path)
        transport = request.transport
        cert = transport.get_extra_info("peercert") if transport is not None else None
        if cert:
            names = dict(pair[0] for pair in cert["subject"])
            self.client_names.append(names["commonName"])

    async def handle(self, request: web.Request) -> web.Response:
        self._seen(request)
        assert self.issuer is not None
        jwk = json.loads(self.issuer.jwks())["keys"][0]
        if request.path == "/.well-known/openid-configuration":
            return web.json_response({"issuer": self.url, "jwks_uri": f"{self.url}/jwks"})
        if request.path == "/jwks":
            return web.json_response({"keys": [jwk]})
        if request.path == "/bundle":
            return web.json_response({"keys": [{**jwk, "use": "jwt-svid"}]})
        if request.path == "/revocations":
            return web.json_response(
                {"subjects": ["spiffe://demo.local/ns/x/sa/revoked"], "jtis": []},
                headers={"ETag": '"r1"'},
            )
        return web.json_response(
            {
                "path": request.path,
                "authorization": request.headers.get("Authorization", "").split(" ")[0],
                "dpop": "DPoP" in request.headers,
                "host": request.headers.get("Host"),
            }
        )

    async def start(self) -> HttpsServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ctx).start()
        self.port = next(a[1] for a in self._runner.addresses if isinstance(a, tuple))
        self.issuer = DevIssuer(self.url)
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _client_tls(pki: LocalPKI, trust: str) -> dict[str, str] | None:
    if trust == "system":
        return None
    block = {"ca_file": str(pki.ca_file)}
    if trust == "ca+client_cert":
        block |= {"cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    return block


def _authz(server: HttpsServer, tls: dict[str, str] | None) -> AuthzService:
    with_tls: dict[str, Any] = {} if tls is None else {"tls": tls}
    cfg = parse_authz_config(
        {
            "audience": AUDIENCE,
            "issuers": [{"issuer": server.url, "discovery": True, **with_tls}],
            "trust_domains": [
                {"name": TRUST_DOMAIN, "bundle_endpoint": f"{server.url}/bundle", **with_tls}
            ],
            "revocation": {"url": f"{server.url}/revocations", "wait": 0, **with_tls},
            "grpc": {"enabled": False},
            "http": {"enabled": False},
            "unknown_kid_wait": 0.2,
            "rules": [{"name": "all", "principals": ["**"], "paths": ["/"]}],
        }
    )
    # A replay store older than any proof here: no restart guard to wait out.
    replay = InMemoryReplayStore(1000, epoch=time.time() - 60)
    return AuthzService(cfg, CollectorRegistry(), replay=replay)


@pytest.mark.parametrize(
    ("server_requires_client_cert", "trust", "trusted"),
    [
        (False, "ca", True),
        (False, "system", False),  # the test CA is in no system store
        (True, "ca", False),  # the server wants a client certificate we do not have
        (True, "ca+client_cert", True),
    ],
)
def test_authz_fetches_trust_the_configured_ca_and_fail_closed_without_it(
    pki: LocalPKI, server_requires_client_cert: bool, trust: str, trusted: bool
) -> None:
    async def body() -> None:
        ctx = pki.server_context(require_client_cert=server_requires_client_cert)
        server = await HttpsServer(ctx).start()
        assert server.issuer is not None
        svc = _authz(server, _client_tls(pki, trust))
        try:
            await svc.start()
            decision = await svc.authorizer.decide(_view(server.issuer))
            bundle = svc.bundle_sources[TRUST_DOMAIN]
            issuer = svc.sources[server.url]
            poller = svc.revocation_poller
            assert poller is not None
            if trusted:
                assert isinstance(decision, Allow), decision
                assert svc.bundles.key_count() == 1, bundle.last_error
                for _ in range(100):  # the poller's first answer
                    if svc.revocations.version is not None:
                        break
                    await asyncio.sleep(0.05)
                assert svc.revocations.version == '"r1"'
                assert "spiffe://demo.local/ns/x/sa/revoked" in svc.revocations.subjects
            else:
                # Fail closed: no keys, so tokens are denied with the outage's reason.
                assert isinstance(decision, Deny) and decision.reason.value == "unknown_key"
                assert svc.bundles.key_count() == 0 and svc.keys.key_count() == 0
                await asyncio.sleep(0.3)
                assert svc.revocations.version is None
                for source in (issuer, bundle):
                    assert source.last_error is not None
                    if trust == "system":
                        assert "certificate verify failed" in source.last_error
                assert "/jwks" not in server.hits and "/bundle" not in server.hits
            if server_requires_client_cert and trusted:
                assert set(server.client_names) == {"sidecar client"}
        finally:
            await svc.stop()
            await server.close()

    run(body)


class Egress:
    """A real token chain (MiniIssuer → K8sAttestor → TokenSource) behind an EgressProxy whose
    upstreams are https listeners of one server."""

    def __init__(self, tmp: Path, upstreams: list[dict[str, Any]]) -> None:
        self.tmp = tmp
        self.upstreams = upstreams

    async def __aenter__(self) -> Egress:
        self.issuer = await MiniIssuer(ttl=300).start()
        token_file = self.tmp / "sa-token"
        token_file.write_text(self.issuer.cluster.sa_token())
        signer = generate_signer()
        attestor = K8sAttestor(
            issuer=self.issuer.url, token_file=str(token_file), signer=signer, timeout=2
        )
        registry = CollectorRegistry()
        self.tokens = TokenSource(
            attestor, RefreshPolicy(), [ORDERS], metrics=IdentityMetrics(registry)
        )
        await self.tokens.start()
        cfg = parse_egress_config({"upstreams": self.upstreams, "timeouts": {"total": 5}})
        self.proxy = EgressProxy(cfg, tokens=self.tokens, signer=signer, registry=registry)
        await self.proxy.start()
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()
        await self.proxy.stop()
        await self.tokens.close()
        await self.issuer.close()

    async def get(self, name: str) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.proxy.ports[name]}/orders/1"
        async with self.session.get(url) as resp:
            return resp.status, {
                **await resp.json(),
                "x-sidecar-error": resp.headers.get("X-Sidecar-Error"),
            }


def test_egress_https_upstreams_trust_ca_present_client_cert_and_check_the_name(
    pki: LocalPKI, tmp_path: Path
) -> None:
    async def body() -> None:
        server = await HttpsServer(pki.server_context(require_client_cert=True)).start()
        mtls = {
            "ca_file": str(pki.ca_file),
            "cert_file": str(pki.client_cert),
            "key_file": str(pki.client_key),
        }

        def upstream(
            name: str, tls: dict[str, str] | None, host: str = "127.0.0.1"
        ) -> dict[str, Any]:
            item: dict[str, Any] = {
                "name": name,
                "listen": "127.0.0.1:0",
                "upstream": f"https://{host}:{server.port}",
                "audience": ORDERS,
            }
            if tls is not None:
                item["tls"] = tls
            return item

        upstreams = [
            upstream("mtls", mtls),
            # Connect to 127.0.0.1 but check the certificate (and send SNI) for another name.
            upstream("named", {**mtls, "server_name": "orders.internal"}),
            upstream("wrong_name", {**mtls, "server_name": "payments.internal"}),
            upstream("no_ca", None),
            upstream("no_client_cert", {"ca_file": str(pki.ca_file)}),
        ]
        try:
            async with Egress(tmp_path, upstreams) as egress:
                status, answer = await egress.get("mtls")
                assert status == 200, answer
                assert answer["authorization"] == "DPoP" and answer["dpop"]
                status, answer = await egress.get("named")
                assert status == 200, answer
                assert server.client_names == ["sidecar client", "sidecar client"]
                for name in ("wrong_name", "no_ca"):
                    status, answer = await egress.get(name)
                    assert (status, answer["x-sidecar-error"]) == (502, "upstream_tls_error")
                    assert "not trusted" in answer["detail"], answer
                # The server refuses a connection without a client certificate: under TLS 1.3
                # that refusal arrives after our side of the handshake (upstream_error).
                status, answer = await egress.get("no_client_cert")
                assert status == 502, answer
                assert answer["x-sidecar-error"] in ("upstream_tls_error", "upstream_error")
                assert len(server.hits) == 2, server.hits
        finally:
            await server.close()

    run(body)


def test_a_tls_listener_closes_a_connection_that_never_completes_its_handshake(
    pki: LocalPKI,
) -> None:
    """The guard counts a connection only after the handshake: until then the head deadline
    (``header_timeout``) bounds it, not the event loop's default of a minute."""

    async def body() -> None:
        async def hello(_: web.Request) -> web.Response:
            return web.Response(text="hello")

        app = web.Application()
        app.router.add_get("/", hello)
        limits = ConnLimits(header_timeout=0.5)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, **server_options(limits))
        await runner.setup()
        guard = ListenerGuard("tls_test", limits, CollectorRegistry())
        tls = parse_tls_server(
            {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}, "tls"
        )
        assert tls is not None
        site = GuardedSite(runner, guard, ("127.0.0.1", 0), ssl_context=tls.context)
        await site.start()
        port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        try:
            # A real client gets through.
            client_ctx = client_context(str(pki.ca_file))
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"https://127.0.0.1:{port}/", ssl=client_ctx) as resp,
            ):
                assert resp.status == 200 and await resp.text() == "hello"
            # A TCP connection that sends nothing is closed at the deadline.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert time.monotonic() - started < 3
            writer.close()
        finally:
            await runner.cleanup()

    run(body)
