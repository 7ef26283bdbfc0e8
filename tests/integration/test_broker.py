"""The broker as a real process: discovery, JWKS, Unix attestation over its socket (this test
process is the workload), RFC 8693 exchange of Kubernetes-style service-account tokens issued
by a real local HTTP issuer, revocation through the CLI, audit and metrics. Issued tokens are
verified with an independent JOSE library (jwcrypto)."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwcrypto import jwk, jwt

from sidecar.authz.trust_domains import TrustBundles
from sidecar.broker.oauth import WIT_TOKEN_TYPE
from sidecar.identity.attestors import K8sAttestor
from sidecar.identity.key import generate_signer
from sidecar.identity.rfc8693_exchange import WIT_AUDIENCE
from sidecar.jose.b64 import b64url_decode
from sidecar.jose.rfc9449_dpop import ProofSigner
from sidecar.jose.spiffe_bundle import import_bundle
from sidecar.jose.wimse_wit import WitPolicy, verify_wit
from sidecar.jose.wimse_wpt import WptPolicy, WptSigner, verify_wpt
from tests.integration.broker_process import (
    EXCHANGE,
    PYTHON,
    TOKEN_TYPE_JWT,
    TRUST,
    BrokerProcess,
    ClusterIssuer,
    cluster_config,
    k8s_entries,
    new_signer,
    post_form,
    python_entries,
)
from tests.integration.harness import REPO_ROOT, free_port, http_request
from tests.integration.live_metrics import check_live_metrics, sample

ORDERS = f"{TRUST}/ns/shop/sa/orders"
PAYMENTS = f"{TRUST}/ns/shop/sa/payments"
VAULT = f"{TRUST}/ns/bank/sa/vault"  # no entry may request it


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterIssuer]:
    issuer = ClusterIssuer()
    try:
        yield issuer
    finally:
        issuer.stop()


@pytest.fixture(scope="module")
def broker(
    tmp_path_factory: pytest.TempPathFactory, cluster: ClusterIssuer
) -> Iterator[BrokerProcess]:
    tmp = tmp_path_factory.mktemp("broker")
    proc = BrokerProcess(
        tmp,
        entries=python_entries() + k8s_entries(cluster.issuer),
        clusters=[cluster_config(cluster)],
        extra={"tokens": {"ttl": 300, "high_privilege_audiences": [ORDERS, VAULT]}},
    ).start()
    try:
        yield proc
    finally:
        proc.stop()


def verify_independently(broker: BrokerProcess, token: str) -> dict[str, Any]:
    """Check signature, typ and claims with jwcrypto against the published JWKS."""
    status, _, body = http_request(f"{broker.issuer}/jwks.json")
    assert status == 200
    keyset = jwk.JWKSet.from_json(body.decode())
    parsed = jwt.JWT(jwt=token, key=keyset, algs=["ES256"], expected_type="JWS")
    header = json.loads(parsed.header)
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "ES256"
    assert keyset.get_key(header["kid"]) is not None
    claims: dict[str, Any] = json.loads(parsed.claims)
    return claims


# -- discovery and keys ------------------------------------------------------------------------


def test_discovery_and_jwks(broker: BrokerProcess) -> None:
    meta = broker.get("/.well-known/openid-configuration")
    assert meta.status == 200
    assert meta.body == {
        "issuer": broker.issuer,
        "jwks_uri": f"{broker.issuer}/jwks.json",
        "token_endpoint": f"{broker.issuer}/token",
        "grant_types_supported": [EXCHANGE],
        "token_endpoint_auth_methods_supported": ["none"],
        "dpop_signing_alg_values_supported": [
            "ES256",
            "ES384",
            "Ed25519",
            "EdDSA",
            "PS256",
            "RS256",
        ],  # RFC 9864 Ed25519 and the older EdDSA
        "subject_types_supported": ["public"],
        # REQUIRED (RFC 8414 §2, OIDC Discovery §3): no authorization endpoint, so no
        # response type; no ID tokens, so the algorithm our JWTs are signed with.
        "response_types_supported": [],
        "id_token_signing_alg_values_supported": ["ES256"],
        "revocation_list_uri": f"{broker.issuer}/revocations",
    }
    assert broker.get("/.well-known/oauth-authorization-server").body == meta.body
    keys = broker.get("/jwks.json")
    assert keys.status == 200
    assert keys.headers["cache-control"] == "public, max-age=60"
    [key] = keys.body["keys"]
    assert set(key) == {"kty", "crv", "x", "y", "kid", "alg", "use"}, "no private member"
    # kid is the RFC 7638 thumbprint, computed here by jwcrypto.
    assert jwk.JWK(**key).thumbprint() == key["kid"]
    again = broker.get("/jwks.json", {"If-None-Match": keys.headers["etag"]})
    assert again.status == 304


# -- Unix attestation --------------------------------------------------------------------------


def test_unix_attested_client_gets_bound_token(broker: BrokerProcess) -> None:
    signer = new_signer()
    answer = broker.unix_token([ORDERS], signer)
    assert answer.status == 200, answer.body
    assert answer.headers["cache-control"] == "no-store"
    assert answer.body["token_type"] == "DPoP"
    assert answer.body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert answer.body["expires_in"] == 120  # the entry's own ttl
    claims = verify_independently(broker, answer.token)
    # The most specific entry matching uid + path + sha256 of this very interpreter.
    assert claims["sub"] == f"{TRUST}/unix/python"
    assert claims["client_id"] == claims["sub"]
    assert claims["iss"] == broker.issuer
    assert claims["aud"] == ORDERS
    assert claims["cnf"] == {"jkt": signer.thumbprint}
    assert claims["exp"] - claims["iat"] == 120 and claims["nbf"] == claims["iat"]
    assert len(claims["jti"]) >= 22  # 128 bits, base64url

    record = broker.wait_audit(lambda r: r.get("jti") == claims["jti"])
    assert record["event"] == "issuance" and record["result"] == "ok"
    assert record["attestor"] == "unix"
    assert record["pid"] == os.getpid() and record["uid"] == os.getuid()
    assert record["exe"] == PYTHON
    assert record["sha256"] == hashlib.sha256(Path(PYTHON).read_bytes()).hexdigest()
    assert record["jkt"] == signer.thumbprint
    assert answer.token not in broker.audit_path.read_text(), "the token reached the audit log"


def test_unix_attested_client_gets_a_wit_svid(broker: BrokerProcess) -> None:
    """requested_token_type=...:wit: a WIT-SVID for the key of the request's DPoP proof, its
    issuer keys in the SPIFFE bundle at /bundle (use: wit-svid); a WPT by that key verifies."""
    workload_key = ec.generate_private_key(ec.SECP256R1())
    signer = ProofSigner(workload_key)
    answer = broker.unix_token([], signer, extra=[("requested_token_type", WIT_TOKEN_TYPE)])
    assert answer.status == 200, answer.body
    assert answer.headers["cache-control"] == "no-store"
    assert answer.body["issued_token_type"] == WIT_TOKEN_TYPE
    assert answer.body["token_type"] == "N_A"
    assert answer.body["expires_in"] == 14400  # tokens.wit_ttl's default: hours
    status, _, body = http_request(f"{broker.issuer}/bundle")
    assert status == 200
    bundles = TrustBundles()
    bundles.replace("test.local", import_bundle(json.loads(body)))
    now = time.time()
    wit = verify_wit(answer.token, keys=bundles, now=now, policy=WitPolicy(svid=True))
    assert wit.subject == f"{TRUST}/unix/python"
    assert wit.key.thumbprint == signer.thumbprint and wit.key_alg == "ES256"
    assert wit.issuer == broker.issuer
    header = json.loads(b64url_decode(answer.token.split(".")[0]))
    assert header["typ"] == "wit+jwt" and set(header) == {"alg", "kid", "typ"}
    url = "https://orders.test.local/pay"
    wpt = WptSigner(workload_key, "ES256").proof(url=url, wit=answer.token, now=now)
    assert verify_wpt(wpt, wit=wit, now=now, policy=WptPolicy(), url=url).jti
    # The access-token JWKS is no WIT bundle: keys with use "sig" are not wit-svid keys.
    _, _, jwks = http_request(f"{broker.issuer}/jwks.json")
    assert import_bundle(json.loads(jwks)) == []
    record = broker.wait_audit(lambda r: r.get("jkt") == signer.thumbprint)
    assert record["result"] == "ok" and record["sub"] == wit.subject
    assert answer.token not in broker.audit_path.read_text()


def test_unix_wit_refusals(broker: BrokerProcess) -> None:
    other = broker.unix_token([], extra=[("requested_token_type", "urn:example:other")])
    assert (other.status, other.error) == (400, "invalid_request")
    # An Ed25519 proof key cannot be a WIT-SVID's cnf key (the profile has no EdDSA).
    ed = ProofSigner(ed25519.Ed25519PrivateKey.generate(), "EdDSA")
    answer = broker.unix_token([], ed, extra=[("requested_token_type", WIT_TOKEN_TYPE)])
    assert (answer.status, answer.error) == (400, "invalid_request"), answer.body


def test_unix_several_audiences_and_keepalive(broker: BrokerProcess) -> None:
    answer = broker.unix_token([ORDERS, PAYMENTS, ORDERS])
    claims = verify_independently(broker, answer.token)
    assert claims["aud"] == [ORDERS, PAYMENTS]


@pytest.mark.parametrize(
    ("case", "error", "status", "reason"),
    [
        ("no_proof", "invalid_dpop_proof", 400, "proof_missing"),
        ("wrong_htu", "invalid_dpop_proof", 400, "htu_mismatch"),
        ("garbage_proof", "invalid_dpop_proof", 400, "proof_invalid"),
        ("not_allowed_audience", "invalid_target", 400, "audience_not_allowed"),
        ("no_audience", "invalid_request", 400, "invalid_request"),
    ],
)
def test_unix_refusals(
    broker: BrokerProcess, case: str, error: str, status: int, reason: str
) -> None:
    audiences = [ORDERS]
    kwargs: dict[str, Any] = {}
    if case == "no_proof":
        kwargs["proof"] = None
    elif case == "wrong_htu":
        kwargs["htu"] = "http://localhost/other"
    elif case == "garbage_proof":
        kwargs["proof"] = "eyJhbGciOiJFUzI1NiJ9.e30.AAAA"
    elif case == "not_allowed_audience":
        audiences = [f"{TRUST}/ns/bank/sa/vault"]
    elif case == "no_audience":
        audiences = []
    audited = len(broker.audit())
    answer = broker.unix_token(audiences, **kwargs)
    assert (answer.status, answer.error) == (status, error), answer.body
    assert answer.headers["cache-control"] == "no-store"
    [record] = broker.audit_since(audited)
    assert (record["event"], record["error"], record["reason"]) == ("refusal", error, reason)
    assert record["pid"] == os.getpid() and record["attestor"] == "unix"


def test_unix_replayed_proof_is_refused(broker: BrokerProcess) -> None:
    signer = new_signer()
    proof = signer.proof(method="POST", url="http://localhost/token", now=time.time())
    assert broker.unix_token([ORDERS], signer, proof=proof).status == 200
    again = broker.unix_token([ORDERS], signer, proof=proof)
    assert (again.status, again.error) == (400, "invalid_dpop_proof")
    assert "already used" in again.body["error_description"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_other_binary_is_refused(broker: BrokerProcess) -> None:
    """The same user running another program (curl) matches no entry: 403 and an audit line."""
    proof = new_signer().proof(method="POST", url="http://localhost/token", now=time.time())
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
            broker.socket,
            "-H",
            f"DPoP: {proof}",
            "--data-urlencode",
            f"audience={ORDERS}",
            "http://localhost/token",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    body, _, code = out.stdout.rpartition("\n")
    assert code == "403", out.stdout
    assert json.loads(body)["error"] == "access_denied"
    record = broker.wait_audit(
        lambda r: r["event"] == "attestation_failure" and r.get("exe", "").endswith("/curl")
    )
    assert record["reason"] == "no_entry" and record["uid"] == os.getuid()


def test_registration_for_other_uid_or_binary_refuses(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tmp = tmp_path_factory.mktemp("strict")
    uid = os.getuid()
    other_hash = hashlib.sha256(b"not the python binary").hexdigest()
    strict = BrokerProcess(
        tmp,
        name="strict",
        entries=[
            {
                "spiffe_id": f"{TRUST}/unix/other-uid",
                "selectors": [f"unix:uid:{uid + 1}", f"unix:path:{PYTHON}"],
                "audiences": ["**"],
            },
            {
                "spiffe_id": f"{TRUST}/unix/other-binary",
                "selectors": [f"unix:uid:{uid}", f"unix:sha256:{other_hash}"],
                "audiences": ["**"],
            },
        ],
        extra={"admin": {"enabled": False, "socket": str(tmp / "strict-run" / "admin.sock")}},
    )
    strict.process.start()
    try:
        deadline = time.monotonic() + 20
        while "broker ready" not in strict.process.log_text():
            strict.process.assert_running()
            assert time.monotonic() < deadline, strict.process.log_text()
            time.sleep(0.02)
        answer = strict.unix_token([ORDERS])
        assert (answer.status, answer.error) == (403, "access_denied"), answer.body
        assert f"uid={uid}" in answer.body["error_description"]
        record = strict.wait_audit(lambda r: r["event"] == "attestation_failure")
        assert record["reason"] == "no_entry"
        assert record["pid"] == os.getpid() and record["exe"] == PYTHON
        assert record["sha256"] == hashlib.sha256(Path(PYTHON).read_bytes()).hexdigest()
        assert "sub" not in record and "jti" not in record
    finally:
        strict.stop()


# -- RFC 8693 token exchange -------------------------------------------------------------------


def test_service_account_token_is_exchanged(broker: BrokerProcess, cluster: ClusterIssuer) -> None:
    signer = new_signer()
    sa_token = cluster.sa_token(ttl=3600)
    answer = broker.exchange(sa_token, [ORDERS], signer)
    assert answer.status == 200, answer.body
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["pragma"] == "no-cache"
    assert answer.body["token_type"] == "DPoP"
    assert answer.body["expires_in"] == 300
    claims = verify_independently(broker, answer.token)
    assert claims["sub"] == f"{TRUST}/ns/shop/sa/frontend"
    assert claims["cnf"]["jkt"] == signer.thumbprint
    record = broker.wait_audit(lambda r: r.get("jti") == claims["jti"])
    assert record["attestor"] == "k8s" and record["namespace"] == "shop"
    assert record["service_account"] == "frontend" and record["cluster"] == cluster.issuer
    audit_text = broker.audit_path.read_text()
    assert sa_token not in audit_text and answer.token not in audit_text
    # The cluster's keys came from its discovery document, over HTTP.
    assert "/.well-known/openid-configuration" in cluster.requests


def test_issued_token_never_outlives_the_subject_token(
    broker: BrokerProcess, cluster: ClusterIssuer
) -> None:
    answer = broker.exchange(cluster.sa_token(ttl=40), [ORDERS])
    assert answer.status == 200, answer.body
    assert 35 <= answer.body["expires_in"] <= 40


def test_the_k8s_attestor_gets_a_wit_bound_to_its_key(
    broker: BrokerProcess, cluster: ClusterIssuer, tmp_path: Path
) -> None:
    """The identity client's WIT slot through RFC 8693: requested_token_type wit, no
    audience; the WIT confirms the client's key and never outlives the subject token."""
    token_file = tmp_path / "sa-token"
    token_file.write_text(cluster.sa_token(ttl=600))
    signer = generate_signer()

    async def fetch() -> Any:
        attestor = K8sAttestor(
            issuer=broker.issuer,
            token_file=str(token_file),
            signer=signer,
            token_endpoint=broker.token_url,
        )
        try:
            return await attestor.fetch(WIT_AUDIENCE)
        finally:
            await attestor.close()

    issued = asyncio.run(fetch())
    assert issued.token_type == "WIT" and issued.issued_token_type == WIT_TOKEN_TYPE
    assert issued.expires_at - time.time() <= 600  # the SA token's 600 s, not wit_ttl's 4 h
    _, _, body = http_request(f"{broker.issuer}/bundle")
    bundles = TrustBundles()
    bundles.replace("test.local", import_bundle(json.loads(body)))
    wit = verify_wit(issued.token, keys=bundles, now=time.time(), policy=WitPolicy(svid=True))
    assert wit.subject == f"{TRUST}/ns/shop/sa/frontend"
    assert wit.key.thumbprint == signer.thumbprint
    record = broker.wait_audit(lambda r: r.get("jkt") == signer.thumbprint)
    assert record["attestor"] == "k8s" and record["result"] == "ok"


@pytest.mark.parametrize(
    ("case", "status", "error", "reason"),
    [
        ("wrong_audience", 400, "invalid_request", "wrong_audience"),
        ("expired", 400, "invalid_request", "expired"),
        ("foreign_issuer", 400, "invalid_request", "untrusted_issuer"),
        ("forged_signature", 400, "invalid_request", "bad_signature"),
        ("malformed", 400, "invalid_request", "malformed_token"),
        # RFC 8693 §2.2.2: a subject token unacceptable by policy is invalid_request.
        ("unregistered_sa", 400, "invalid_request", "no_entry"),
        ("audience_not_allowed", 400, "invalid_target", "audience_not_allowed"),
        ("no_proof", 400, "invalid_dpop_proof", "proof_missing"),
        ("proof_for_other_url", 400, "invalid_dpop_proof", "htu_mismatch"),
        ("proof_other_method", 400, "invalid_dpop_proof", "htm_mismatch"),
        ("proof_too_old", 400, "invalid_dpop_proof", "iat_out_of_window"),
        ("unsupported_grant", 400, "unsupported_grant_type", "unsupported_grant_type"),
        ("wrong_token_type", 400, "invalid_request", "subject_token_type"),
        ("repeated_parameter", 400, "invalid_request", "invalid_request"),
        ("missing_subject_token", 400, "invalid_request", "invalid_request"),
        ("not_a_form", 400, "invalid_request", "invalid_request"),
        ("scope", 400, "invalid_scope", "invalid_scope"),
        # 400, not a 401 without the challenge RFC 9110 §15.5.2 requires.
        ("client_secret", 400, "invalid_client", "invalid_client"),
    ],
)
def test_exchange_refusals(
    broker: BrokerProcess,
    cluster: ClusterIssuer,
    case: str,
    status: int,
    error: str,
    reason: str,
) -> None:
    signer = new_signer()
    token = cluster.sa_token()
    audiences = [ORDERS]
    kwargs: dict[str, Any] = {}
    form: list[tuple[str, str]] | None = None
    now = time.time()
    if case == "wrong_audience":
        token = cluster.sa_token(aud="https://kubernetes.default.svc")
    elif case == "expired":
        token = cluster.sa_token(now=now - 7200, ttl=600)
    elif case == "foreign_issuer":
        foreign = ClusterIssuer()
        try:
            token = foreign.sa_token()
        finally:
            foreign.stop()
    elif case == "forged_signature":
        from tests.integration.broker_process import rsa_key

        token = cluster.sa_token(key=rsa_key())
    elif case == "malformed":
        token = "not.a.jwt"
    elif case == "unregistered_sa":
        token = cluster.sa_token(service_account="intruder")
    elif case == "audience_not_allowed":
        audiences = [f"{TRUST}/ns/bank/sa/vault"]
    elif case == "no_proof":
        kwargs["proof"] = None
    elif case == "proof_for_other_url":
        kwargs["proof"] = signer.proof(method="POST", url=f"{broker.issuer}/other", now=now)
    elif case == "proof_other_method":
        kwargs["proof"] = signer.proof(method="GET", url=broker.token_url, now=now)
    elif case == "proof_too_old":
        kwargs["proof"] = signer.proof(method="POST", url=broker.token_url, now=now - 600)
    elif case == "unsupported_grant":
        form = [("grant_type", "client_credentials"), ("audience", ORDERS)]
    elif case == "wrong_token_type":
        form = [
            ("grant_type", EXCHANGE),
            ("subject_token", token),
            ("audience", ORDERS),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:access_token"),
        ]
    elif case == "repeated_parameter":
        form = [
            ("grant_type", EXCHANGE),
            ("subject_token", token),
            ("subject_token", token),
            ("subject_token_type", TOKEN_TYPE_JWT),
            ("audience", ORDERS),
        ]
    elif case == "missing_subject_token":
        token = None  # type: ignore[assignment]
    elif case == "not_a_form":
        kwargs["content_type"] = "application/json"
    elif case == "scope":
        form = [
            ("grant_type", EXCHANGE),
            ("subject_token", token),
            ("scope", "admin"),
            ("subject_token_type", TOKEN_TYPE_JWT),
            ("audience", ORDERS),
        ]
    elif case == "client_secret":
        form = [
            ("grant_type", EXCHANGE),
            ("subject_token", token),
            ("client_secret", "s3cr3t"),
            ("subject_token_type", TOKEN_TYPE_JWT),
            ("audience", ORDERS),
        ]
    audited = len(broker.audit())
    answer = broker.exchange(token, audiences, signer, form=form, **kwargs)
    assert (answer.status, answer.error) == (status, error), answer.body
    assert set(answer.body) == {"error", "error_description"}
    assert answer.status != 401 or "www-authenticate" in answer.headers
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["content-type"].startswith("application/json")
    # Every refusal is audited (exactly one record), with the precise reason, never the token.
    [record] = broker.audit_since(audited)
    assert record["event"] in ("refusal", "attestation_failure")
    assert record["result"] == "denied" and record["attestor"] == "k8s"
    assert (record["error"], record["reason"]) == (error, reason)
    if token:
        assert token not in broker.audit_path.read_text()


def test_get_on_token_endpoint_is_405(broker: BrokerProcess) -> None:
    assert broker.get("/token").status == 405


def test_client_authentication_attempt_is_invalid_client(
    broker: BrokerProcess, cluster: ClusterIssuer
) -> None:
    """RFC 6749 §5.2: a client that authenticates with the Authorization header gets 401 and
    a challenge for its scheme (we offer no client authentication: workloads are attested)."""
    signer = new_signer()
    conn = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=10)
    try:
        answer = post_form(
            conn,
            "/token",
            [
                ("grant_type", EXCHANGE),
                ("subject_token", cluster.sa_token()),
                ("subject_token_type", TOKEN_TYPE_JWT),
                ("audience", ORDERS),
            ],
            [
                ("Authorization", "Basic Y2xpZW50OnNlY3JldA=="),
                ("DPoP", signer.proof(method="POST", url=broker.token_url, now=time.time())),
            ],
        )
    finally:
        conn.close()
    assert (answer.status, answer.error) == (401, "invalid_client"), answer.body
    assert answer.headers["www-authenticate"].startswith("Basic ")


def test_second_broker_on_the_same_socket_refuses_to_start(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    # Same attestation socket, other TCP ports: the socket is what must be refused (the
    # ports would be refused first, before anything is bound).
    cfg = yaml.safe_load(broker.config_path.read_text())
    cfg["listen"] = f"127.0.0.1:{free_port()}"
    if "admin" in cfg:
        cfg["admin"]["listen"] = f"127.0.0.1:{free_port()}"
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "broker", "-c", str(second)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert "attestation.socket" in out.stderr and "running broker" in out.stderr
    assert broker.unix_token([ORDERS]).status == 200, "the running broker is unaffected"


# -- revocation, metrics -----------------------------------------------------------------------


def test_revocation_list_cli_etag_and_persistence(broker: BrokerProcess) -> None:
    first = broker.get("/revocations")
    assert first.status == 200
    assert first.headers["etag"].startswith('"') and first.headers["cache-control"] == "no-cache"
    assert broker.get("/revocations", {"If-None-Match": first.headers["etag"]}).status == 304

    victim = f"{TRUST}/ns/old/sa/gone"
    rc, out, err = broker.revoke("--sub", victim)
    assert rc == 0, err
    assert json.loads(out)["changed"] is True
    rc, _, err = broker.revoke("--jti", "some-token-id")
    assert rc == 0, err
    after = broker.get("/revocations", {"If-None-Match": first.headers["etag"]})
    assert after.status == 200
    assert victim in after.body["subjects"] and "some-token-id" in after.body["jtis"]
    assert after.headers["etag"] != first.headers["etag"]
    state = json.loads(broker.state_file.read_text())
    assert victim in state["subjects"] and "some-token-id" in state["jtis"]
    record = broker.wait_audit(lambda r: r["event"] == "revocation" and r.get("sub") == victim)
    assert record["actor_uid"] == os.getuid()

    rc, _, err = broker.revoke("--sub", victim, "--restore")
    assert rc == 0, err
    assert victim not in broker.get("/revocations").body["subjects"]
    rc, _, err = broker.revoke("--sub", "")
    assert rc == 1 and "HTTP 400" in err


def test_revoked_subject_gets_no_new_token(broker: BrokerProcess) -> None:
    subject = f"{TRUST}/unix/python"
    assert broker.revoke("--sub", subject)[0] == 0
    try:
        answer = broker.unix_token([ORDERS])
        assert (answer.status, answer.error) == (403, "access_denied")
        assert "revoked" in answer.body["error_description"]
    finally:
        assert broker.revoke("--sub", subject, "--restore")[0] == 0
    assert broker.unix_token([ORDERS]).status == 200


def test_metrics_and_health(broker: BrokerProcess) -> None:
    before = check_live_metrics(f"{broker.admin_url}/metrics")
    signer = new_signer()
    proof = signer.proof(method="POST", url="http://localhost/token", now=time.time())
    assert broker.unix_token([ORDERS], signer, proof=proof).status == 200
    assert broker.unix_token([ORDERS], signer, proof=proof).status == 400  # replayed
    assert http_request(f"{broker.admin_url}/healthz")[0] == 200
    text = check_live_metrics(f"{broker.admin_url}/metrics")

    def grown(name: str, **labels: str) -> float:
        return (sample(text, name, **labels) or 0) - (sample(before, name, **labels) or 0)

    # M6 and M5: the replay by finer reason, the grant of a listed high-privilege audience;
    # a listed audience nobody asked for is exposed at 0, as are the rotation outcomes.
    assert grown("sidecar_broker_refusals_total", attestor="unix", reason="replayed") == 1
    assert grown("sidecar_broker_high_privilege_grants_total", audience=ORDERS) == 1
    assert sample(text, "sidecar_broker_high_privilege_grants_total", audience=VAULT) == 0
    assert sample(text, "sidecar_broker_key_rotations_total", outcome="failed") == 0
    assert 'sidecar_broker_issuance_total{attestor="unix",result="issued"}' in text
    assert 'sidecar_broker_issuance_seconds_count{attestor="unix"}' in text
    assert 'sidecar_broker_issuance_total{attestor="k8s",result="invalid_request"}' in text
    assert 'sidecar_broker_attestation_failures_total{attestor="k8s",reason="no_entry"}' in text
    assert "sidecar_broker_published_keys 1.0" in text


def test_admin_socket_is_private(broker: BrokerProcess) -> None:
    mode = os.stat(broker.admin_socket).st_mode & 0o777
    assert mode == 0o600
    assert os.stat(broker.socket).st_mode & 0o777 == 0o666


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "entries:\n  - spiffe_id: spiffe://test.local/x\n    selectors: [unix:uid:abc]\n"
        "    audiences: ['*']\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "broker", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        check=False,
    )
    assert out.returncode == 2
    assert "entries[0].selectors[0]" in out.stderr, out.stderr
