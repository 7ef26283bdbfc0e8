"""Every refusal reason of the broker (``sidecar.broker.codes.BrokerReason``), each from a
crafted token request through the decision core (``Broker``) with its real attestors: this
process as the unix peer, a cluster key file for the k8s subject tokens. A meta-test fails when
a reason is added without a case here."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from factory import DROP, NOW, Issuer, ec_key, make_broker, rsa_issuer

from sidecar.broker.attestation_unix import PeerCreds, read_starttime
from sidecar.broker.codes import BrokerReason, OAuthCode
from sidecar.broker.core import Broker
from sidecar.broker.oauth import (
    ACCESS_TOKEN_TYPE,
    FORM_CONTENT_TYPE,
    JWT_TOKEN_TYPE,
    TOKEN_EXCHANGE_GRANT,
    WIT_TOKEN_TYPE,
    OAuthError,
    TokenHttpRequest,
)
from sidecar.jose.rfc9449_dpop import ProofSigner

UNIX_URL = "http://localhost/token"
TCP_URL = "http://127.0.0.1:8443/token"
SA = "system:serviceaccount:shop:frontend"
AUD = "broker"
Run = Callable[["Env"], OAuthError]


class Env:
    """One broker, a unix entry for this process (audiences ``svc-*``) and a k8s entry for
    shop/frontend of the test cluster."""

    def __init__(self, tmp: Path, **sections: Any) -> None:
        self.cluster: Issuer = rsa_issuer()
        jwks = tmp / "cluster-jwks.json"
        jwks.write_text(json.dumps({"keys": [{**self.cluster.jwk, "alg": "RS256"}]}))
        cluster = {"issuer": self.cluster.iss, "jwks_file": str(jwks), "audiences": [AUD]}
        self.broker: Broker = make_broker(
            entries=[
                {
                    "spiffe_id": "spiffe://t/me",
                    "selectors": [f"unix:uid:{os.getuid()}"],
                    "audiences": ["svc-*"],
                },
                {
                    "spiffe_id": "spiffe://t/frontend",
                    "selectors": ["k8s:ns:shop", "k8s:sa:frontend"],
                    "audiences": ["svc-*"],
                },
            ],
            clusters=[sections.pop("cluster", cluster)],
            **sections,
        )
        asyncio.run(self.broker.clusters.start())
        self.signer = ProofSigner(ec_key(60))
        self.me = PeerCreds(
            os.getpid(), os.getuid(), os.getgid(), read_starttime(os.getpid()), None
        )

    def proof(self, url: str, *, method: str = "POST", now: float = NOW) -> str:
        return self.signer.proof(method=method, url=url, now=now)

    def unix(
        self,
        pairs: list[tuple[str, str]] | None = None,
        *,
        peer: PeerCreds | None = None,
        proofs: tuple[str, ...] | None = None,
        htu: str | None = UNIX_URL,
        authorization: str | None = None,
    ) -> OAuthError:
        http = TokenHttpRequest(
            FORM_CONTENT_TYPE,
            urlencode(pairs if pairs is not None else [("audience", "svc-a")]).encode(),
            authorization,
            proofs if proofs is not None else (self.proof(UNIX_URL),),
            htu,
        )
        return _refusal(self.broker.attest_unix(peer or self.me, http))

    def exchange(self, token: str | None = None, **form: str) -> OAuthError:
        pairs = {
            "grant_type": TOKEN_EXCHANGE_GRANT,
            "subject_token": token if token is not None else self.sa_token(),
            "subject_token_type": JWT_TOKEN_TYPE,
            "audience": "svc-a",
            **form,
        }
        http = TokenHttpRequest(
            FORM_CONTENT_TYPE, urlencode(pairs).encode(), None, (self.proof(TCP_URL),), TCP_URL
        )
        return _refusal(self.broker.exchange(http))

    def sa_token(self, **claims: Any) -> str:
        kw: dict[str, Any] = {"sub": SA, "aud": AUD, "cnf": DROP, "client_id": DROP, **claims}
        header = kw.pop("header", None)
        kid = kw.pop("kid", None)
        alg = kw.pop("alg", None)
        return self.cluster.token(
            self.cluster.claims(**kw), typ="JWT", header=header, kid=kid, alg=alg
        )


def _refusal(coro: Any) -> OAuthError:
    try:
        issued = asyncio.run(coro)
    except OAuthError as exc:
        return exc
    raise AssertionError(f"issued instead of refused: {issued!r}")


def _replayed(env: Env) -> OAuthError:
    proof = env.proof(UNIX_URL)
    env.unix(proofs=(proof,), pairs=[("audience", "other")])  # refused later, proof recorded
    return env.unix(proofs=(proof,))


def _store_full(env: Env) -> OAuthError:
    env.unix([("audience", "other")])  # its proof takes the one place (capacity 1)
    return env.unix()  # a fresh proof finds no room


def _revoked(env: Env) -> OAuthError:
    env.broker.revocations.revoke_subject("spiffe://t/me")
    return env.unix()


def _bad_signature(env: Env) -> OAuthError:
    head, body, sig = env.sa_token().split(".")
    return env.exchange(f"{head}.{body}.{sig[:-4]}AAAA")


def _alg_not_allowed(env: Env) -> OAuthError:
    token = env.sa_token(alg="PS256")  # the RSA key, an algorithm the cluster does not allow
    return env.exchange(token)


#: reason -> (how to provoke it, the OAuth error the client sees, extra broker sections)
CASES: dict[BrokerReason, tuple[Run, OAuthCode, dict[str, Any]]] = {
    BrokerReason.INVALID_REQUEST: (lambda e: e.unix([]), OAuthCode.INVALID_REQUEST, {}),
    BrokerReason.INVALID_CLIENT: (
        lambda e: e.unix(authorization="Basic eDp5"),
        OAuthCode.INVALID_CLIENT,
        {},
    ),
    BrokerReason.INVALID_TARGET: (
        lambda e: e.unix([("resource", "https://x")]),
        OAuthCode.INVALID_TARGET,
        {},
    ),
    BrokerReason.INVALID_SCOPE: (lambda e: e.exchange(scope="read"), OAuthCode.INVALID_SCOPE, {}),
    BrokerReason.UNSUPPORTED_GRANT_TYPE: (
        lambda e: e.exchange(grant_type="password"),
        OAuthCode.UNSUPPORTED_GRANT_TYPE,
        {},
    ),
    BrokerReason.SUBJECT_TOKEN_TYPE: (
        lambda e: e.exchange(subject_token_type=ACCESS_TOKEN_TYPE),
        OAuthCode.INVALID_REQUEST,
        {},
    ),
    BrokerReason.NO_HOST: (lambda e: e.unix(htu=None), OAuthCode.INVALID_REQUEST, {}),
    BrokerReason.PROOF_MISSING: (lambda e: e.unix(proofs=()), OAuthCode.INVALID_DPOP_PROOF, {}),
    BrokerReason.PROOF_INVALID: (
        lambda e: e.unix(proofs=("not.a.proof",)),
        OAuthCode.INVALID_DPOP_PROOF,
        {},
    ),
    BrokerReason.HTM_MISMATCH: (
        lambda e: e.unix(proofs=(e.proof(UNIX_URL, method="GET"),)),
        OAuthCode.INVALID_DPOP_PROOF,
        {},
    ),
    BrokerReason.HTU_MISMATCH: (
        lambda e: e.unix(proofs=(e.proof("http://elsewhere/token"),)),
        OAuthCode.INVALID_DPOP_PROOF,
        {},
    ),
    BrokerReason.IAT_OUT_OF_WINDOW: (
        lambda e: e.unix(proofs=(e.proof(UNIX_URL, now=NOW - 3600),)),
        OAuthCode.INVALID_DPOP_PROOF,
        {},
    ),
    BrokerReason.REPLAYED: (_replayed, OAuthCode.INVALID_DPOP_PROOF, {}),
    BrokerReason.REPLAY_STORE_UNAVAILABLE: (
        _store_full,
        OAuthCode.TEMPORARILY_UNAVAILABLE,
        {"dpop": {"replay_capacity": 1}},
    ),
    BrokerReason.MALFORMED_TOKEN: (lambda e: e.exchange("x.y"), OAuthCode.INVALID_REQUEST, {}),
    BrokerReason.EXPIRED: (
        lambda e: e.exchange(e.sa_token(now=NOW - 7200, ttl=60)),
        OAuthCode.INVALID_REQUEST,
        {},
    ),
    BrokerReason.NOT_YET_VALID: (
        lambda e: e.exchange(e.sa_token(nbf=int(NOW + 3600))),
        OAuthCode.INVALID_REQUEST,
        {},
    ),
    BrokerReason.BAD_SIGNATURE: (_bad_signature, OAuthCode.INVALID_REQUEST, {}),
    BrokerReason.UNKNOWN_KEY: (
        lambda e: e.exchange(e.sa_token(kid="rotated-away")),
        OAuthCode.INVALID_REQUEST,
        {},
    ),
    BrokerReason.ALG_NOT_ALLOWED: (_alg_not_allowed, OAuthCode.INVALID_REQUEST, {}),
    BrokerReason.WRONG_AUDIENCE: (
        lambda e: e.exchange(e.sa_token(aud="someone-else")),
        OAuthCode.INVALID_REQUEST,
        {},
    ),
    BrokerReason.UNTRUSTED_ISSUER: (
        lambda e: e.exchange(e.sa_token(iss="https://other.cluster")),
        OAuthCode.INVALID_REQUEST,
        {},
    ),
    BrokerReason.NOT_SERVICE_ACCOUNT: (
        lambda e: e.exchange(e.sa_token(sub="alice")),
        OAuthCode.INVALID_REQUEST,
        {},
    ),
    BrokerReason.CLUSTER_KEYS_UNAVAILABLE: (
        lambda e: e.exchange(),
        OAuthCode.TEMPORARILY_UNAVAILABLE,
        {"cluster": "no keys"},  # replaced by a cluster whose key file is empty
    ),
    BrokerReason.NO_PEER_CREDENTIALS: (
        lambda e: e.unix(peer=PeerCreds(0, os.getuid(), os.getgid(), None, None)),
        OAuthCode.ACCESS_DENIED,
        {},
    ),
    BrokerReason.PEER_GONE: (
        lambda e: e.unix(peer=PeerCreds(os.getpid(), os.getuid(), os.getgid(), None, None)),
        OAuthCode.ACCESS_DENIED,
        {},
    ),
    BrokerReason.PEER_CHANGED: (
        lambda e: e.unix(
            peer=PeerCreds(os.getpid(), os.getuid(), os.getgid(), e.me.starttime + 1, None)  # type: ignore[operator]
        ),
        OAuthCode.ACCESS_DENIED,
        {},
    ),
    BrokerReason.NO_ENTRY: (
        lambda e: e.exchange(e.sa_token(sub="system:serviceaccount:shop:backend")),
        OAuthCode.INVALID_REQUEST,
        {},
    ),
    BrokerReason.AUDIENCE_NOT_ALLOWED: (
        lambda e: e.unix([("audience", "db")]),
        OAuthCode.INVALID_TARGET,
        {},
    ),
    BrokerReason.REVOKED: (_revoked, OAuthCode.ACCESS_DENIED, {}),
    BrokerReason.WIT_KEY_ALG: (
        lambda e: e.unix([("requested_token_type", WIT_TOKEN_TYPE)]),
        OAuthCode.INVALID_REQUEST,
        {"keys": {"algorithm": "Ed25519"}},
    ),
}


def test_every_reason_has_a_case() -> None:
    assert set(CASES) == set(BrokerReason)


@pytest.mark.parametrize("reason", list(CASES), ids=str)
def test_each_reason(reason: BrokerReason, tmp_path: Path) -> None:
    run, error, sections = CASES[reason]
    sections = dict(sections)
    if sections.get("cluster") == "no keys":
        empty = tmp_path / "empty-jwks.json"
        empty.write_text("")
        sections["cluster"] = {
            "issuer": rsa_issuer().iss,
            "jwks_file": str(empty),
            "audiences": [AUD],
        }
    env = Env(tmp_path, **sections)
    refusal = run(env)
    assert (refusal.reason, refusal.error) == (reason, error), refusal.description
    assert type(refusal.reason) is BrokerReason and type(refusal.error) is OAuthCode


def test_a_jose_reason_the_broker_lacks_maps_to_the_fallback() -> None:
    """No label value comes from outside the closed set."""
    from sidecar.broker.codes import from_jose
    from sidecar.errors import Reason

    assert from_jose(Reason.HTU_MISMATCH, BrokerReason.PROOF_INVALID) is BrokerReason.HTU_MISMATCH
    assert from_jose(Reason.ATH_MISMATCH, BrokerReason.PROOF_INVALID) is BrokerReason.PROOF_INVALID
    assert (
        from_jose(Reason.WRONG_TYPE, BrokerReason.MALFORMED_TOKEN) is BrokerReason.MALFORMED_TOKEN
    )
