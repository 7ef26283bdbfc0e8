"""Test fixtures without pytest: issuers, client keys, tokens, proofs, an Authorizer, requests.

Everything is deterministic where the key type allows it (EC and Ed25519 keys are derived from
fixed private values; RSA keys are generated once per process and cached). Time never comes
from the real clock: ``NOW`` is a fixed instant and every helper takes ``now`` explicitly.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from prometheus_client import CollectorRegistry

from sidecar.authz.core import Authorizer, AuthzSettings, PendingAllow
from sidecar.authz.decision import Allow, Decision, Deny, RequestView
from sidecar.authz.nonce import NonceService
from sidecar.authz.policy import Policy
from sidecar.authz.replay import InMemoryReplayStore, ReplayStore
from sidecar.authz.revocation import RevocationList
from sidecar.broker.config import parse_broker_config
from sidecar.broker.core import Broker
from sidecar.broker.keys import KeyRing, make_signing_key
from sidecar.broker.service import BrokerService
from sidecar.jose.b64 import b64url_encode
from sidecar.jose.jwks import KeyStore
from sidecar.jose.rfc7515_jws import sign_compact
from sidecar.jose.rfc7517_jwk import import_public_jwk, public_jwk_dict
from sidecar.jose.rfc9068_access_token import IssuerPolicy
from sidecar.jose.rfc9449_dpop import ProofSigner, access_token_hash

#: The frozen instant every test runs at (2023-11-14T22:13:20Z).
NOW = 1_700_000_000.0

AUDIENCE = "spiffe://demo.local/ns/shop/sa/orders"
HOST = "orders.demo.local"
SCHEME = "https"

ES_ISSUER = "https://issuer.demo.local"
RSA_ISSUER = "https://rsa-issuer.example"
ED_ISSUER = "https://ed-issuer.example"

FRONTEND = "spiffe://demo.local/ns/shop/sa/frontend"
CHECKOUT = "spiffe://demo.local/ns/shop/sa/checkout"
INTRUDER = "spiffe://demo.local/ns/other/sa/intruder"

NONCE_SECRET = b"unit-test-nonce-secret-0123456789"
NONCE_WINDOW = 60.0

POLICY_CONFIG: dict[str, Any] = {
    "routes": [
        {"prefix": "/public", "auth": "bearer"},
        {"prefix": "/pay", "nonce": True},
    ],
    "rules": [
        {
            "name": "frontend-orders",
            "principals": [FRONTEND],
            "methods": ["GET", "POST"],
            "paths": ["/orders", "/pay", "/public"],
        },
        {
            "name": "shop-catalog",
            "principals": ["spiffe://demo.local/ns/shop/**"],
            "methods": ["GET"],
            "paths": ["/catalog"],
        },
    ],
}


# -- keys -----------------------------------------------------------------------------------


def ec_key(seed: int, curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    """A deterministic EC private key (the private value is derived from ``seed``)."""
    curve = curve or ec.SECP256R1()
    value = int.from_bytes(hashlib.sha256(f"ec-{seed}".encode()).digest(), "big") % (2**200) + 1
    return ec.derive_private_key(value, curve)


def ed_key(seed: int) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(
        hashlib.sha256(f"ed-{seed}".encode()).digest()
    )


@functools.cache
def rsa_key(label: str, bits: int = 2048) -> rsa.RSAPrivateKey:
    """RSA keys cannot be derived cheaply from a seed: generate once per process and label."""
    del label  # only distinguishes cache entries
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


# -- issuers and tokens ---------------------------------------------------------------------


@dataclass
class Issuer:
    iss: str
    alg: str
    kid: str
    private_key: Any
    algorithms: frozenset[str]

    @property
    def jwk(self) -> dict[str, str]:
        return public_jwk_dict(self.private_key, kid=self.kid)

    @property
    def policy(self) -> IssuerPolicy:
        return IssuerPolicy(self.iss, self.algorithms)

    def claims(
        self,
        *,
        sub: str = FRONTEND,
        aud: Any = AUDIENCE,
        now: float = NOW,
        ttl: float = 300,
        jkt: str | None = None,
        jti: str = "token-jti-1",
        **extra: Any,
    ) -> dict[str, Any]:
        claims: dict[str, Any] = {
            "iss": self.iss,
            "sub": sub,
            "aud": aud,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + ttl),
            "jti": jti,
            "client_id": "frontend",
        }
        if jkt is not None:
            claims["cnf"] = {"jkt": jkt}
        claims.update(extra)
        return {k: v for k, v in claims.items() if v is not DROP}

    def token(
        self,
        claims: dict[str, Any] | None = None,
        *,
        typ: str | None = "at+jwt",
        alg: str | None = None,
        kid: str | None = None,
        header: dict[str, Any] | None = None,
        **claim_kw: Any,
    ) -> str:
        """Sign an access token; keyword arguments go to ``claims()``."""
        if claims is None:
            claims = self.claims(**claim_kw)
        hdr: dict[str, Any] = {"kid": kid or self.kid}
        if typ is not None:
            hdr["typ"] = typ
        hdr.update(header or {})
        return sign_compact(self.private_key, alg or self.alg, claims, header=hdr)


#: Pass as a claim value to ``Issuer.claims`` to leave the claim out.
DROP: Any = object()


def es_issuer() -> Issuer:
    return Issuer(ES_ISSUER, "ES256", "es-1", ec_key(1), frozenset({"ES256"}))


def rsa_issuer() -> Issuer:
    return Issuer(RSA_ISSUER, "RS256", "rsa-1", rsa_key("issuer"), frozenset({"RS256", "PS256"}))


def ed_issuer() -> Issuer:
    return Issuer(ED_ISSUER, "EdDSA", "ed-1", ed_key(1), frozenset({"EdDSA"}))


def key_store(*issuers: Issuer) -> KeyStore:
    store = KeyStore()
    for issuer in issuers:
        store.replace(issuer.iss, [import_public_jwk(issuer.jwk)])
    return store


def encode_segment(value: Any) -> str:
    return b64url_encode(json.dumps(value, separators=(",", ":")).encode())


def unsigned_jws(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A compact JWS whose signature is whatever bytes you pass (e.g. an HMAC)."""
    sig = b64url_encode(signature) if signature else "AA"
    return f"{encode_segment(header)}.{encode_segment(claims)}.{sig}"


def hs256_token(secret: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """The classic key-confusion token: HS256 "signed" with a public key as the HMAC secret."""
    signing_input = f"{encode_segment(header)}.{encode_segment(claims)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url_encode(mac)}"


# -- the authorizer -------------------------------------------------------------------------


def settings(*issuers: Issuer, **overrides: Any) -> AuthzSettings:
    return AuthzSettings(
        audiences=frozenset({AUDIENCE}),
        issuers={i.iss: i.policy for i in issuers},
        **overrides,
    )


def _no_real_clock() -> float:
    raise AssertionError("the Authorizer read its own clock: pass `now` explicitly")


def url_for(path: str, *, host: str = HOST, scheme: str = SCHEME) -> str:
    return f"{scheme}://{host}{path.split('?', 1)[0]}"


@dataclass
class Harness:
    """One authorizer with its collaborators, plus a client that holds a DPoP key."""

    issuer: Issuer
    issuers: tuple[Issuer, ...]
    keys: KeyStore
    policy: Policy
    nonces: NonceService
    replay: ReplayStore
    revocations: RevocationList
    client_key: Any
    client: ProofSigner
    authz: Authorizer
    other_client: ProofSigner = field(default_factory=lambda: ProofSigner(ec_key(99)))

    # tokens and proofs

    def token(self, *, bound: bool = True, **kw: Any) -> str:
        if bound:
            kw.setdefault("jkt", self.client.thumbprint)
        return self.issuer.token(**kw)

    def proof(
        self,
        token: str | None,
        *,
        method: str = "GET",
        path: str = "/orders",
        now: float = NOW,
        signer: ProofSigner | None = None,
        url: str | None = None,
        **kw: Any,
    ) -> str:
        signer = signer or self.client
        return signer.proof(
            method=method, url=url or url_for(path), now=now, access_token=token, **kw
        )

    def manual_proof(
        self,
        token: str | None,
        *,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
        key: Any = None,
        alg: str = "ES256",
        method: str = "GET",
        path: str = "/orders",
        now: float = NOW,
    ) -> str:
        """A proof built field by field (ProofSigner fixes the header); ``DROP`` removes one."""
        body: dict[str, Any] = {
            "jti": "manual-proof-jti",
            "htm": method,
            "htu": url_for(path),
            "iat": int(now),
        }
        if token is not None:
            body["ath"] = access_token_hash(token)
        body.update(claims or {})
        hdr: dict[str, Any] = {"typ": "dpop+jwt", "jwk": self.client.public_jwk}
        hdr.update(header or {})
        body = {k: v for k, v in body.items() if v is not DROP}
        hdr = {k: v for k, v in hdr.items() if v is not DROP}
        return sign_compact(key or self.client_key, alg, body, header=hdr)

    def nonce(self, now: float = NOW) -> str:
        return self.nonces.issue(now)

    def dpop_request(
        self,
        *,
        method: str = "GET",
        path: str = "/orders",
        now: float = NOW,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        **proof_kw: Any,
    ) -> RequestView:
        """A correct DPoP request; override pieces to break exactly one thing."""
        token = token if token is not None else self.token()
        proof = self.proof(token, method=method, path=path, now=now, **proof_kw)
        hdrs = {"authorization": f"DPoP {token}", "dpop": proof}
        hdrs.update(headers or {})
        return view(method=method, path=path, headers=hdrs)

    def bearer_request(
        self,
        *,
        method: str = "GET",
        path: str = "/public/info",
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> RequestView:
        token = token if token is not None else self.token(bound=False)
        hdrs = {"authorization": f"Bearer {token}"}
        hdrs.update(headers or {})
        return view(method=method, path=path, headers=hdrs)

    # decisions

    def decide(self, request: RequestView, now: float = NOW) -> Decision:
        decision: Decision = run(self.authz.decide(request, now))
        return decision

    def evaluate(self, request: RequestView, now: float = NOW) -> Deny | PendingAllow:
        return self.authz.evaluate(request, now)


def view(
    *,
    method: str = "GET",
    path: str = "/orders",
    headers: Mapping[str, str] | None = None,
    authority: str = HOST,
    scheme: str = SCHEME,
) -> RequestView:
    return RequestView(method, scheme, authority, path, dict(headers or {}))


def make_harness(
    *,
    issuer: Issuer | None = None,
    extra_issuers: tuple[Issuer, ...] = (),
    policy_config: Mapping[str, Any] | None = None,
    replay: ReplayStore | None = None,
    revocations: RevocationList | None = None,
    **setting_overrides: Any,
) -> Harness:
    issuer = issuer or es_issuer()
    issuers = (issuer, *extra_issuers)
    keys = key_store(*issuers)
    policy = Policy.from_config(dict(policy_config or POLICY_CONFIG))
    nonces = NonceService(NONCE_SECRET, window=NONCE_WINDOW)
    replay = replay if replay is not None else InMemoryReplayStore(epoch=NOW - 3600)
    revocations = revocations if revocations is not None else RevocationList()
    client_key = ec_key(7)
    authz = Authorizer(
        settings(*issuers, **setting_overrides),
        keys=keys,
        policy=policy,
        replay=replay,
        nonces=nonces,
        revocations=revocations,
        clock=_no_real_clock,
    )
    return Harness(
        issuer=issuer,
        issuers=issuers,
        keys=keys,
        policy=policy,
        nonces=nonces,
        replay=replay,
        revocations=revocations,
        client_key=client_key,
        client=ProofSigner(client_key),
        authz=authz,
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- reading decisions ----------------------------------------------------------------------


def header(decision: Deny | Allow, name: str) -> str | None:
    pairs = decision.headers if isinstance(decision, Deny) else decision.headers_to_set
    values = [v for k, v in pairs if k == name]
    assert len(values) <= 1, f"{name} set more than once: {values}"
    return values[0] if values else None


def challenge_scheme(www_authenticate: str) -> str:
    return www_authenticate.split(" ", 1)[0].rstrip(",")


def challenge_error(www_authenticate: str) -> str | None:
    match = re.search(r'\berror="([^"]*)"', www_authenticate)
    return match.group(1) if match else None


def as_allow(decision: Decision | PendingAllow) -> Allow:
    if isinstance(decision, PendingAllow):
        return decision.allow
    assert isinstance(decision, Allow), f"expected Allow, got {decision!r}"
    return decision


# -- the broker -------------------------------------------------------------------------------

UNIX_ENTRY = {"spiffe_id": "spiffe://t/a", "selectors": ["unix:uid:1"], "audiences": ["**"]}


def make_broker(**sections: Any) -> Broker:
    """A Broker on a parsed configuration (``sections`` override the top-level keys), with its
    real collaborators and the clock frozen at NOW; signing keys are ES256 or Ed25519."""
    cfg = parse_broker_config({"entries": [UNIX_ENTRY], **sections})
    service = BrokerService(cfg, CollectorRegistry())
    alg = cfg.keys.schedule.alg
    private = ed_key(50) if alg in ("Ed25519", "EdDSA") else ec_key(50)
    ring = KeyRing(cfg.keys.schedule, make_signing_key(private, alg, NOW), NOW)
    return Broker(
        cfg,
        ring=ring,
        clusters=service.clusters,
        unix=service.unix,
        revocations=service.revocations,
        audit=service.audit,
        metrics=service.metrics,
        clock=lambda: NOW,
    )
