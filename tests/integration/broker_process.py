"""Helpers for the broker's integration tests (no tests here).

* :class:`ClusterIssuer` — a stand-in Kubernetes service-account issuer: its own RSA key, and a
  REAL HTTP server (stdlib, in a thread) serving OIDC discovery and the JWKS, as a kube-apiserver
  with ``--service-account-issuer`` does.
* :class:`BrokerProcess` — ``python -m sidecar broker -c cfg.yaml`` as a real process, with
  helpers to call its TCP token endpoint and its Unix attestation socket.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.jose.rfc7515_jws import sign_compact
from sidecar.jose.rfc7517_jwk import jwks_json, public_jwk_dict
from sidecar.jose.rfc9449_dpop import ProofSigner
from tests.integration.harness import REPO_ROOT, ManagedProcess, free_port, wait_for_http

SA_AUDIENCE = "broker.test"
TRUST = "spiffe://test.local"
PYTHON = os.path.realpath(sys.executable)
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"

_RSA_KEYS: list[rsa.RSAPrivateKey] = []


def rsa_key() -> rsa.RSAPrivateKey:
    """RSA generation is slow: a few keys per session, reused."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _RSA_KEYS.append(key)
    return key


class ClusterIssuer:
    """A Kubernetes-like service-account token issuer on a real local HTTP server."""

    def __init__(self, kid: str = "sa-key-1", tls: ssl.SSLContext | None = None) -> None:
        self.key = rsa_key()
        self.kid = kid
        self.port = free_port()
        self.issuer = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.requests: list[str] = []
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.requests.append(self.path)
                if self.path == "/.well-known/openid-configuration":
                    body = json.dumps(
                        {
                            "issuer": issuer.issuer,
                            "jwks_uri": f"{issuer.issuer}/openid/v1/jwks",
                            "response_types_supported": ["id_token"],
                            "subject_types_supported": ["public"],
                            "id_token_signing_alg_values_supported": ["RS256"],
                        }
                    ).encode()
                elif self.path == "/openid/v1/jwks":
                    body = jwks_json(
                        [public_jwk_dict(issuer.key, kid=issuer.kid, alg="RS256")]
                    ).encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def sa_token(
        self,
        namespace: str = "shop",
        service_account: str = "frontend",
        *,
        aud: str | list[str] = SA_AUDIENCE,
        ttl: float = 3600,
        now: float | None = None,
        iss: str | None = None,
        key: Any = None,
        kubernetes_claim: bool = True,
    ) -> str:
        """A projected service-account token, shaped like the kubelet's."""
        now = time.time() if now is None else now
        claims: dict[str, Any] = {
            "aud": aud if isinstance(aud, list) else [aud],
            "exp": int(now + ttl),
            "iat": int(now),
            "nbf": int(now),
            "iss": iss or self.issuer,
            "jti": secrets.token_hex(16),
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }
        if kubernetes_claim:
            claims["kubernetes.io"] = {
                "namespace": namespace,
                "node": {"name": "node-1", "uid": "6c0f2a4e-0000-4000-8000-000000000001"},
                "pod": {"name": f"{service_account}-7d9f", "uid": secrets.token_hex(8)},
                "serviceaccount": {"name": service_account, "uid": secrets.token_hex(8)},
            }
        return sign_compact(key or self.key, "RS256", claims, header={"kid": self.kid})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def new_signer() -> ProofSigner:
    return ProofSigner(ec.generate_private_key(ec.SECP256R1()))


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def error(self) -> str | None:
        return self.body.get("error") if isinstance(self.body, dict) else None

    @property
    def token(self) -> str:
        assert self.status == 200, (self.status, self.body)
        token = self.body["access_token"]
        assert isinstance(token, str)
        return token


def _answer(resp: http.client.HTTPResponse) -> Answer:
    raw = resp.read()
    headers = {k.lower(): v for k, v in resp.getheaders()}
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = raw.decode(errors="replace")
    return Answer(resp.status, headers, body)


def post_form(
    conn: http.client.HTTPConnection,
    path: str,
    form: Sequence[tuple[str, str]],
    headers: Sequence[tuple[str, str]] = (),
    content_type: str = "application/x-www-form-urlencoded",
) -> Answer:
    body = urllib.parse.urlencode(list(form)).encode()
    conn.putrequest("POST", path)
    conn.putheader("Content-Type", content_type)
    conn.putheader("Content-Length", str(len(body)))
    for name, value in headers:
        conn.putheader(name, value)
    conn.endheaders(body)
    return _answer(conn.getresponse())


class BrokerProcess:
    """A running broker with its config, ports, socket paths and audit log."""

    def __init__(
        self,
        tmp: Path,
        *,
        name: str = "broker",
        entries: list[dict[str, Any]],
        clusters: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
        tls: dict[str, str] | None = None,
    ) -> None:
        """``tls``: the broker's ``tls`` block (it then serves https)."""
        self.tmp = tmp
        self.port = free_port()
        self.admin_port = free_port()
        self.issuer = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        run = tmp / f"{name}-run"
        self.socket = str(run / "attestation.sock")
        self.admin_socket = str(run / "admin.sock")
        self.audit_path = tmp / f"{name}-audit.jsonl"
        self.state_file = tmp / f"{name}-revocations.json"
        cfg: dict[str, Any] = {
            "issuer": self.issuer,
            "listen": f"127.0.0.1:{self.port}",
            "attestation": {"socket": self.socket},
            "admin": {"listen": f"127.0.0.1:{self.admin_port}", "socket": self.admin_socket},
            "audit": {"path": str(self.audit_path)},
            "revocation": {"state_file": str(self.state_file)},
            "clusters": clusters or [],
            "entries": entries,
        }
        if tls is not None:
            cfg["tls"] = tls
        for key, value in (extra or {}).items():
            cfg[key] = value
        self.config_path = tmp / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.process = ManagedProcess(
            [sys.executable, "-m", "sidecar", "broker", "-c", str(self.config_path)],
            name=name,
            log_dir=tmp,
            cwd=REPO_ROOT,
        )

    def start(self, timeout: float = 20.0) -> BrokerProcess:
        self.process.start()
        try:
            wait_for_http(f"{self.admin_url}/readyz", timeout, process=self.process)
        except BaseException:
            self.process.stop()
            raise
        return self

    def stop(self) -> None:
        self.process.stop()

    def restart(self) -> BrokerProcess:
        """Stop the broker and start a new process on the same configuration and ports."""
        self.stop()
        old = self.process
        self.process = ManagedProcess(old.args, name=old.name, log_dir=self.tmp, cwd=REPO_ROOT)
        return self.start()

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    def audit(self) -> list[dict[str, Any]]:
        try:
            text = self.audit_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def audit_since(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The records written after the first ``count`` (waiting for at least one)."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.audit()
            if len(records) > count:
                return records[count:]
            if time.monotonic() > deadline:
                raise AssertionError("no new audit record")
            time.sleep(0.02)

    def wait_audit(self, pred: Any, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for record in self.audit():
                if pred(record):
                    return record
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching audit record in {self.audit()[-5:]}")
            time.sleep(0.02)

    # -- clients ----------------------------------------------------------------------------

    def unix_token(
        self,
        audiences: Sequence[str],
        signer: ProofSigner | None = None,
        *,
        proof: str | bool | None = True,
        htu: str = "http://localhost/token",
        extra: Sequence[tuple[str, str]] = (),
    ) -> Answer:
        """``POST /token`` on the attestation socket (this test process is the workload)."""
        signer = signer or new_signer()
        headers = []
        if proof is True:
            headers.append(("DPoP", signer.proof(method="POST", url=htu, now=time.time())))
        elif isinstance(proof, str):
            headers.append(("DPoP", proof))
        conn = UnixHTTPConnection(self.socket)
        try:
            fields = [("audience", a) for a in audiences] + list(extra)
            return post_form(conn, "/token", fields, headers)
        finally:
            conn.close()

    def exchange(
        self,
        subject_token: str | None,
        audiences: Sequence[str],
        signer: ProofSigner | None = None,
        *,
        proof: str | bool | None = True,
        form: list[tuple[str, str]] | None = None,
        content_type: str = "application/x-www-form-urlencoded",
    ) -> Answer:
        """RFC 8693 token exchange at the TCP token endpoint."""
        signer = signer or new_signer()
        if form is None:
            form = [("grant_type", EXCHANGE), ("subject_token_type", TOKEN_TYPE_JWT)]
            if subject_token is not None:
                form.append(("subject_token", subject_token))
            form += [("audience", a) for a in audiences]
        headers = []
        if proof is True:
            headers.append(
                ("DPoP", signer.proof(method="POST", url=self.token_url, now=time.time()))
            )
        elif isinstance(proof, str):
            headers.append(("DPoP", proof))
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            return post_form(conn, "/token", form, headers, content_type)
        finally:
            conn.close()

    def get(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers=headers or {})
            return _answer(conn.getresponse())
        finally:
            conn.close()

    def admin_revoke(self, kind: str, value: str, *, restore: bool = False) -> dict[str, Any]:
        """POST /admin/revoke on the admin socket directly: no CLI process start-up in the
        timing (the CLI itself is tested with :meth:`revoke`)."""
        conn = UnixHTTPConnection(self.admin_socket)
        try:
            body = json.dumps({kind: value, "action": "restore" if restore else "revoke"})
            conn.request("POST", "/admin/revoke", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        assert resp.status == 200, data
        doc: dict[str, Any] = json.loads(data)
        return doc

    def revoke(self, *args: str) -> tuple[int, str, str]:
        """``sidecar broker revoke -c cfg ARGS`` as a separate process: (rc, stdout, stderr)."""
        return self.cli(["revoke"], *args)

    def cli(self, command: Sequence[str], *args: str) -> tuple[int, str, str]:
        """``sidecar broker COMMAND -c cfg ARGS`` as a separate process: (rc, stdout, stderr)."""
        import subprocess

        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "sidecar",
                "broker",
                *command,
                "-c",
                str(self.config_path),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO_ROOT,
            check=False,
        )
        return out.returncode, out.stdout, out.stderr


def python_entries(extra_audiences: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Entries naming this test process: its uid and its Python binary (real path)."""
    import hashlib

    digest = hashlib.sha256(Path(PYTHON).read_bytes()).hexdigest()
    uid = os.getuid()
    return [
        {
            "spiffe_id": f"{TRUST}/unix/python-any",
            "selectors": [f"unix:uid:{uid}", f"unix:path:{PYTHON}"],
            "audiences": [f"{TRUST}/ns/shop/sa/*"],
        },
        {
            # More specific (adds the hash): this one wins for the test process.
            "spiffe_id": f"{TRUST}/unix/python",
            "selectors": [f"unix:uid:{uid}", f"unix:path:{PYTHON}", f"unix:sha256:{digest}"],
            "audiences": [f"{TRUST}/ns/shop/sa/*", *extra_audiences],
            "ttl": 120,
        },
    ]


def k8s_entries(cluster: str) -> list[dict[str, Any]]:
    return [
        {
            "spiffe_id": f"{TRUST}/ns/shop/sa/frontend",
            "selectors": ["k8s:ns:shop", "k8s:sa:frontend", f"k8s:cluster:{cluster}"],
            "audiences": [f"{TRUST}/ns/shop/sa/orders", f"{TRUST}/ns/shop/sa/payments"],
        },
    ]


def cluster_config(cluster: ClusterIssuer) -> dict[str, Any]:
    return {
        "issuer": cluster.issuer,
        "discovery": True,
        "audiences": [SA_AUDIENCE],
        "algorithms": ["RS256"],
        "min_refresh_interval": 0,
    }
