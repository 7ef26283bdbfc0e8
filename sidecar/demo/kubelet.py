"""A simulated kubelet for the demo: a cluster signing key whose JWKS the broker trusts, and
projected service-account tokens written to a file and rotated like the real kubelet does.

The broker verifies these exactly as it would a real cluster's tokens (signature against the
cluster JWKS, issuer, audience, expiry, then ``system:serviceaccount:NS:SA`` → SPIFFE ID).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.demo.topology import CLUSTER_ISSUER
from sidecar.jose.rfc7515_jws import sign_compact
from sidecar.jose.rfc7517_jwk import jwks_json, public_jwk_dict
from sidecar.jose.rfc7638_thumbprint import jwk_thumbprint


class SimulatedKubelet:
    def __init__(self, workdir: Path, *, audience: str, ttl: float = 600.0) -> None:
        self.workdir = workdir
        self.audience = audience
        self.ttl = ttl
        self._key = ec.generate_private_key(ec.SECP256R1())
        jwk = public_jwk_dict(self._key, alg="ES256")
        self._kid = jwk_thumbprint(jwk)
        jwk["kid"] = self._kid
        self.jwks_path = workdir / "cluster-jwks.json"
        self.jwks_path.write_text(jwks_json([jwk]))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rotations = 0

    def token_path(self, namespace: str, service_account: str) -> Path:
        return self.workdir / f"sa-token-{namespace}-{service_account}"

    def write_token(self, namespace: str, service_account: str) -> Path:
        now = int(time.time())
        claims = {
            "iss": CLUSTER_ISSUER,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "aud": [self.audience],
            "iat": now,
            "nbf": now,
            "exp": now + int(self.ttl),
            "jti": secrets.token_urlsafe(12),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": secrets.token_hex(8)},
            },
        }
        token = sign_compact(self._key, "ES256", claims, header={"kid": self._kid, "typ": "JWT"})
        path = self.token_path(namespace, service_account)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(token)
        os.replace(tmp, path)  # atomic, as the kubelet's symlink swap is
        return path

    def run_rotation(self, namespace: str, service_account: str, every: float) -> None:
        """Rewrite the token every ``every`` seconds in a background thread."""

        def loop() -> None:
            while not self._stop.wait(every):
                self.write_token(namespace, service_account)
                self.rotations += 1

        self._thread = threading.Thread(target=loop, name="kubelet", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
