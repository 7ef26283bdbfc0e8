"""The attestors against a real (in-test) RFC 8693 + RFC 9449 issuer over real sockets.

:class:`MiniIssuer` is a small, strict issuer written from the RFCs (not from our client): OIDC
discovery, JWKS, an RFC 8693 token endpoint that verifies the DPoP proof (RFC 9449 §4.3) and
can demand a nonce (§8), and the broker-style attestation endpoint on a Unix socket that
identifies the caller by SO_PEERCRED. Other egress tests import it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.errors import AuthError
from sidecar.identity.attestors import FileAttestor, K8sAttestor, UnixAttestor
from sidecar.identity.errors import IdentityError
from sidecar.identity.key import generate_signer
from sidecar.jose.rfc7515_jws import sign_compact
from sidecar.jose.rfc7517_jwk import jwks_json, public_jwk_dict
from sidecar.jose.rfc9449_dpop import DPoPPolicy, ProofKeyCache, ProofSigner, verify_proof

ORDERS = "spiffe://demo.local/ns/shop/sa/orders"
PAYMENTS = "spiffe://demo.local/ns/shop/sa/payments"
FORBIDDEN = "spiffe://demo.local/ns/vault/sa/secrets"
FRONTEND = "spiffe://demo.local/ns/shop/sa/frontend"
SA_AUDIENCE = "sts.demo.local"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"


class Cluster:
    """Stands in for the Kubernetes API server: signs projected service-account tokens."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())

    def sa_token(self, namespace: str = "shop", name: str = "frontend", ttl: float = 600) -> str:
        now = int(time.time())
        claims = {
            "iss": "https://kubernetes.default.svc",
            "sub": f"system:serviceaccount:{namespace}:{name}",
            "aud": [SA_AUDIENCE],
            "iat": now,
            "exp": now + int(ttl),
            "jti": secrets.token_hex(8),
        }
        return sign_compact(self.key, "ES256", claims, header={"typ": "JWT", "kid": "sa"})


class MiniIssuer:
    """An RFC 8693 / RFC 9449 issuer for tests. ``fail`` holds scripted answers (status, body,
    headers) returned instead of a token, first in first out."""

    def __init__(
        self,
        cluster: Cluster | None = None,
        *,
        ttl: float = 60.0,
        require_nonce: bool = False,
        audiences: tuple[str, ...] = (ORDERS, PAYMENTS),
        denied: tuple[str, ...] = (FORBIDDEN,),
        discovery: str = "oidc",
    ) -> None:
        self.cluster = cluster or Cluster()
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.ttl = ttl
        self.require_nonce = require_nonce
        self.nonce = secrets.token_urlsafe(16)
        self.audiences = set(audiences)
        self.denied = set(denied)
        self.discovery = discovery
        self.fail: list[tuple[int, Any, dict[str, str]]] = []
        self.requests: list[dict[str, Any]] = []
        self.proof_keys = ProofKeyCache()
        self.issuer_override: str | None = None
        self.port = 0
        self._runners: list[web.AppRunner] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.url}/oauth2/token"

    def metadata(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer_override or self.url,
            "jwks_uri": f"{self.url}/jwks.json",
            "token_endpoint": self.token_endpoint,
            "grant_types_supported": [EXCHANGE],
            "dpop_signing_alg_values_supported": ["ES256"],
        }

    # -- servers --------------------------------------------------------------------------

    async def start(self, unix_path: Path | None = None) -> MiniIssuer:
        app = web.Application()
        well_known = (
            "/.well-known/openid-configuration"
            if self.discovery == "oidc"
            else "/.well-known/oauth-authorization-server"
        )
        app.router.add_get(well_known, self._metadata)
        app.router.add_get("/jwks.json", self._jwks)
        app.router.add_post("/oauth2/token", self._exchange)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        self._runners.append(runner)
        if unix_path is not None:
            uapp = web.Application()
            uapp.router.add_post("/token", self._attest)
            urunner = web.AppRunner(uapp, access_log=None)
            await urunner.setup()
            await web.UnixSite(urunner, str(unix_path)).start()
            self._runners.append(urunner)
        return self

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    async def _metadata(self, _: web.Request) -> web.Response:
        return web.json_response(self.metadata())

    async def _jwks(self, _: web.Request) -> web.Response:
        return web.Response(
            text=jwks_json([public_jwk_dict(self.key, kid="k1", alg="ES256")]),
            content_type="application/json",
        )

    # -- token endpoints ------------------------------------------------------------------

    @staticmethod
    def _error(status: int, code: str, description: str = "", **headers: str) -> web.Response:
        body = {"error": code, "error_description": description or code}
        return web.json_response(
            body, status=status, headers={"Cache-Control": "no-store", **headers}
        )

    def _check_proof(self, request: web.Request, htu: str) -> tuple[str, str | None] | web.Response:
        proofs = request.headers.getall("DPoP", [])
        if len(proofs) != 1:  # RFC 9449 §4.3 step 1
            return self._error(400, "invalid_dpop_proof", "exactly one DPoP header")
        try:
            proof = verify_proof(
                proofs[0],
                method="POST",
                url=htu,
                access_token=None,
                expected_jkt=None,
                now=time.time(),
                policy=DPoPPolicy(algorithms=frozenset({"ES256"})),
                key_cache=self.proof_keys,
            )
        except AuthError as exc:
            return self._error(400, "invalid_dpop_proof", exc.detail)
        if self.require_nonce and proof.nonce != self.nonce:  # §8
            return self._error(
                400, "use_dpop_nonce", "nonce required", **{"DPoP-Nonce": self.nonce}
            )
        return proof.jkt, proof.nonce

    def _mint(self, sub: str, audiences: list[str], jkt: str) -> web.Response:
        now = int(time.time())
        claims = {
            "iss": self.url,
            "sub": sub,
            "aud": audiences[0] if len(audiences) == 1 else audiences,
            "iat": now,
            "nbf": now,
            "exp": now + int(self.ttl),
            "jti": secrets.token_urlsafe(12),
            "client_id": sub,
            "cnf": {"jkt": jkt},
        }
        token = sign_compact(self.key, "ES256", claims, header={"typ": "at+jwt", "kid": "k1"})
        headers = {"Cache-Control": "no-store"}
        if self.require_nonce:
            headers["DPoP-Nonce"] = self.nonce
        return web.json_response(
            {
                "access_token": token,
                "token_type": "DPoP",
                "expires_in": int(self.ttl),
                "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            },
            headers=headers,
        )

    def _audiences(self, form: Any) -> list[str] | web.Response:
        audiences = form.getall("audience", [])
        if not audiences:
            return self._error(400, "invalid_request", "audience is required")
        for aud in audiences:
            if aud in self.denied:
                return self._error(403, "access_denied", f"not allowed to call {aud}")
            if aud not in self.audiences:
                return self._error(400, "invalid_target", f"unknown audience {aud}")
        return list(audiences)

    async def _exchange(self, request: web.Request) -> web.Response:
        form = await request.post()
        record: dict[str, Any] = {"kind": "exchange", "form": {k: form.getall(k) for k in form}}
        self.requests.append(record)
        if self.fail:
            status, body, headers = self.fail.pop(0)
            text = body if isinstance(body, str) else json.dumps(body)
            return web.Response(status=status, text=text, headers=headers)
        checked = self._check_proof(request, self.token_endpoint)
        if isinstance(checked, web.Response):
            return checked
        jkt, record["nonce"] = checked
        if form.get("grant_type") != EXCHANGE:
            return self._error(400, "unsupported_grant_type")
        if form.get("subject_token_type") != "urn:ietf:params:oauth:token-type:jwt":
            return self._error(400, "invalid_request", "subject_token_type")
        try:
            sa = pyjwt.decode(
                str(form.get("subject_token", "")),
                self.cluster.key.public_key(),
                algorithms=["ES256"],
                audience=SA_AUDIENCE,
            )
        except pyjwt.PyJWTError as exc:
            return self._error(400, "invalid_grant", f"subject_token: {exc}")
        _, namespace, name = sa["sub"].rsplit(":", 2)
        audiences = self._audiences(form)
        if isinstance(audiences, web.Response):
            return audiences
        return self._mint(f"spiffe://demo.local/ns/{namespace}/sa/{name}", audiences, jkt)

    async def _attest(self, request: web.Request) -> web.Response:
        form = await request.post()
        sock = request.transport.get_extra_info("socket") if request.transport else None
        assert sock is not None, "attestation request without a socket"
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        self.requests.append(
            {"kind": "attest", "pid": pid, "uid": uid, "form": {k: form.getall(k) for k in form}}
        )
        checked = self._check_proof(request, "http://localhost/token")
        if isinstance(checked, web.Response):
            return checked
        audiences = self._audiences(form)
        if isinstance(audiences, web.Response):
            return audiences
        return self._mint(f"spiffe://demo.local/uid/{uid}", audiences, checked[0])


# -- tests ------------------------------------------------------------------------------------


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 20))


def k8s(issuer: MiniIssuer, token_file: Path, signer: ProofSigner | None = None) -> K8sAttestor:
    return K8sAttestor(
        issuer=issuer.url,
        token_file=str(token_file),
        signer=signer or generate_signer(),
        timeout=2.0,
    )


async def code_of(attestor: Any, audience: str) -> tuple[str, bool]:
    with pytest.raises(IdentityError) as info:
        await attestor.fetch(audience)
    return info.value.code, info.value.retryable


def test_k8s_exchange_discovers_the_endpoint_and_binds_the_token(tmp_path: Path) -> None:
    async def body() -> None:
        issuer = await MiniIssuer().start()
        token_file = tmp_path / "sa-token"
        token_file.write_text(issuer.cluster.sa_token() + "\n")
        signer = generate_signer()
        attestor = k8s(issuer, token_file, signer)
        try:
            tok = await attestor.fetch(ORDERS)
        finally:
            await attestor.close()
            await issuer.close()
        assert tok.is_dpop and tok.audience == ORDERS
        assert tok.claims is not None and tok.claims["sub"] == FRONTEND
        assert tok.claims["cnf"] == {"jkt": signer.thumbprint}
        assert tok.expires_at == pytest.approx(time.time() + 60, abs=3)
        (req,) = issuer.requests
        assert req["form"]["audience"] == [ORDERS]
        assert req["form"]["grant_type"] == [EXCHANGE]

    run(body)


def test_k8s_rereads_the_projected_token_on_every_exchange(tmp_path: Path) -> None:
    async def body() -> None:
        issuer = await MiniIssuer().start()
        token_file = tmp_path / "sa-token"
        attestor = k8s(issuer, token_file)
        first, second = issuer.cluster.sa_token(), issuer.cluster.sa_token()
        try:
            token_file.write_text(first)
            await attestor.fetch(ORDERS)
            token_file.write_text(second)  # the kubelet rotated it
            await attestor.fetch(ORDERS)
        finally:
            await attestor.close()
            await issuer.close()
        seen = [r["form"]["subject_token"][0] for r in issuer.requests]
        assert seen == [first, second]

    run(body)


def test_authorization_server_nonce_is_answered_once_and_reused(tmp_path: Path) -> None:
    async def body() -> None:
        issuer = await MiniIssuer(require_nonce=True).start()
        token_file = tmp_path / "sa-token"
        token_file.write_text(issuer.cluster.sa_token())
        attestor = k8s(issuer, token_file)
        try:
            await attestor.fetch(ORDERS)
            await attestor.fetch(PAYMENTS)
        finally:
            await attestor.close()
            await issuer.close()
        # First: challenged, retried with the nonce. Second: the nonce is known already.
        assert [r.get("nonce") for r in issuer.requests] == [None, issuer.nonce, issuer.nonce]

    run(body)


def test_rfc8414_metadata_when_there_is_no_openid_configuration(tmp_path: Path) -> None:
    async def body() -> None:
        issuer = await MiniIssuer(discovery="rfc8414").start()
        token_file = tmp_path / "sa-token"
        token_file.write_text(issuer.cluster.sa_token())
        attestor = k8s(issuer, token_file)
        try:
            assert (await attestor.fetch(ORDERS)).audience == ORDERS
        finally:
            await attestor.close()
            await issuer.close()

    run(body)


def test_k8s_errors_carry_codes_and_retryability(tmp_path: Path) -> None:
    async def body() -> None:
        issuer = await MiniIssuer().start()
        token_file = tmp_path / "sa-token"
        token_file.write_text(issuer.cluster.sa_token())
        attestor = k8s(issuer, token_file)
        try:
            assert await code_of(attestor, "spiffe://unknown") == ("invalid_target", False)
            assert await code_of(attestor, FORBIDDEN) == ("access_denied", False)
            issuer.fail.append((503, {"error": "server_error"}, {}))
            assert await code_of(attestor, ORDERS) == ("server_error", True)
            issuer.fail.append((429, "", {"Retry-After": "3"}))
            with pytest.raises(IdentityError) as info:
                await attestor.fetch(ORDERS)
            assert info.value.retryable and info.value.retry_after == 3.0
            token_file.write_text(Cluster().sa_token())  # signed by a key the issuer distrusts
            assert await code_of(attestor, ORDERS) == ("invalid_grant", True)
            token_file.unlink()
            assert await code_of(attestor, ORDERS) == ("subject_token_unavailable", True)
        finally:
            await attestor.close()
            await issuer.close()
        # The issuer is gone: a network error, retryable.
        token_file.write_text(issuer.cluster.sa_token())
        gone = k8s(issuer, token_file)
        try:
            assert await code_of(gone, ORDERS) == ("unavailable", True)
        finally:
            await gone.close()

    run(body)


def test_discovery_refuses_a_document_for_another_issuer(tmp_path: Path) -> None:
    async def body() -> None:
        issuer = await MiniIssuer().start()
        issuer.issuer_override = "https://impostor.example"
        token_file = tmp_path / "sa-token"
        token_file.write_text(issuer.cluster.sa_token())
        attestor = k8s(issuer, token_file)
        try:
            assert await code_of(attestor, ORDERS) == ("discovery_failed", False)
        finally:
            await attestor.close()
            await issuer.close()

    run(body)


def test_unix_attestor_is_identified_by_peer_credentials(tmp_path: Path) -> None:
    async def body() -> None:
        sock = tmp_path / "broker.sock"
        issuer = await MiniIssuer(require_nonce=True).start(unix_path=sock)
        signer = generate_signer()
        attestor = UnixAttestor(str(sock), signer, timeout=2.0)
        try:
            tok = await attestor.fetch(ORDERS)
            assert await code_of(attestor, "spiffe://unknown") == ("invalid_target", False)
        finally:
            await attestor.close()
            await issuer.close()
        assert tok.claims is not None
        assert tok.claims["sub"] == f"spiffe://demo.local/uid/{os.getuid()}"
        assert tok.claims["cnf"]["jkt"] == signer.thumbprint
        assert issuer.requests[0]["pid"] == os.getpid()
        assert issuer.requests[0]["form"] == {"audience": [ORDERS]}

    run(body)


def test_unix_attestor_without_broker_is_unavailable(tmp_path: Path) -> None:
    async def body() -> None:
        attestor = UnixAttestor(str(tmp_path / "nothing.sock"), generate_signer(), timeout=1.0)
        try:
            assert await code_of(attestor, ORDERS) == ("unavailable", True)
        finally:
            await attestor.close()

    run(body)


def _file_token(key: ec.EllipticCurvePrivateKey, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": "https://agent", "sub": FRONTEND, "aud": ORDERS, "iat": now, "exp": now + 60}
    body.update(claims)
    return sign_compact(key, "ES256", body, header={"typ": "JWT"})


def test_file_attestor_bearer_dpop_and_change_detection(tmp_path: Path) -> None:
    async def body() -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        signer = generate_signer()
        path = tmp_path / "token.jwt"
        attestor = FileAttestor(str(path), signer)
        assert await code_of(attestor, ORDERS) == ("subject_token_unavailable", True)
        bearer = _file_token(key)
        path.write_text(bearer)
        tok = await attestor.fetch(ORDERS)
        assert tok.token == bearer and tok.token_type == "Bearer"
        assert tok.expires_at == tok.claims["exp"]  # type: ignore[index]
        assert await code_of(attestor, PAYMENTS) == ("invalid_target", True)
        # The agent writes a token bound to our key: sent as DPoP.
        bound = _file_token(key, cnf={"jkt": signer.thumbprint})
        path.write_text(bound)
        tok = await attestor.fetch(ORDERS)
        assert tok.token == bound and tok.token_type == "DPoP"
        path.write_text(_file_token(key, cnf={"jkt": "another-key"}))
        assert await code_of(attestor, ORDERS) == ("binding_mismatch", True)
        path.write_text(_file_token(key, exp=int(time.time()) - 1))
        assert await code_of(attestor, ORDERS) == ("token_expired", True)
        path.write_text("not a jwt")
        assert await code_of(attestor, ORDERS) == ("bad_response", True)

    run(body)
