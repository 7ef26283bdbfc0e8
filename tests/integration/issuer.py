"""A throw-away token issuer for integration tests and benchmarks: one ES256 key, its JWKS
file, and access tokens minted with the same JOSE helpers the broker uses."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.jose.b64 import b64url_encode
from sidecar.jose.rfc7515_jws import sign_compact
from sidecar.jose.rfc7517_jwk import jwks_json, public_jwk_dict
from sidecar.jose.rfc9449_dpop import ProofSigner

ISSUER = "http://issuer.test"
AUDIENCE = "spiffe://demo.local/ns/shop/sa/orders"
FRONTEND = "spiffe://demo.local/ns/shop/sa/frontend"
INTRUDER = "spiffe://demo.local/ns/other/sa/intruder"


class DevIssuer:
    def __init__(self, issuer: str = ISSUER, kid: str = "k1") -> None:
        self.issuer = issuer
        self.kid = kid
        self.key = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> str:
        return jwks_json([public_jwk_dict(self.key, kid=self.kid, alg="ES256")])

    def write_jwks(self, path: Path) -> Path:
        path.write_text(self.jwks())
        return path

    def token(
        self,
        *,
        sub: str = FRONTEND,
        aud: str | list[str] = AUDIENCE,
        jkt: str | None = None,
        ttl: float = 300,
        now: float | None = None,
        header: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        now = time.time() if now is None else now
        body: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": aud,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + ttl),
            "jti": secrets.token_urlsafe(12),
            "client_id": sub,
        }
        if jkt is not None:
            body["cnf"] = {"jkt": jkt}
        body.update(claims)
        hdr = {"typ": "at+jwt", "kid": self.kid, **(header or {})}
        return sign_compact(self.key, "ES256", body, header=hdr)

    def hs256_with_public_key(self, *, jkt: str) -> str:
        """The classic key-confusion forgery: HMAC keyed with the issuer's public key PEM."""
        secret = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        now = int(time.time())
        hdr = {"typ": "at+jwt", "alg": "HS256", "kid": self.kid}
        body = {
            "iss": self.issuer,
            "sub": FRONTEND,
            "aud": AUDIENCE,
            "exp": now + 300,
            "iat": now,
            "cnf": {"jkt": jkt},
        }
        h = b64url_encode(json.dumps(hdr).encode())
        p = b64url_encode(json.dumps(body).encode())
        sig = hmac.new(secret, f"{h}.{p}".encode(), hashlib.sha256).digest()
        return f"{h}.{p}.{b64url_encode(sig)}"

    def alg_none(self, *, jkt: str) -> str:
        now = int(time.time())
        h = b64url_encode(json.dumps({"typ": "at+jwt", "alg": "none"}).encode())
        body = {
            "iss": self.issuer,
            "sub": FRONTEND,
            "aud": AUDIENCE,
            "exp": now + 300,
            "cnf": {"jkt": jkt},
        }
        return f"{h}.{b64url_encode(json.dumps(body).encode())}."


def client_signer() -> ProofSigner:
    return ProofSigner(ec.generate_private_key(ec.SECP256R1()))
