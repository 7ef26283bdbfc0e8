"""Every deny reason the decision core can produce, each from a crafted request.

Each case asserts the full shape of the deny: status, reason, the ``x-authz-reason`` header,
the ``WWW-Authenticate`` scheme and ``error`` parameter (RFC 6750 §3 / RFC 9449 §7.1 and
§8), and ``DPoP-Nonce`` for the two nonce reasons. A meta-test fails when a reason is added to
``sidecar.errors.Reason`` without a case here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from factory import (
    AUDIENCE,
    DROP,
    ES_ISSUER,
    FRONTEND,
    INTRUDER,
    NOW,
    Harness,
    challenge_error,
    challenge_scheme,
    ec_key,
    encode_segment,
    header,
    hs256_token,
    make_harness,
    rsa_key,
    unsigned_jws,
    view,
)
from spiffe_factory import spiffe_harness, svid

from sidecar.authz.decision import Allow, Decision, Deny
from sidecar.authz.nonce import NonceService
from sidecar.authz.replay import InMemoryReplayStore
from sidecar.authz.revocation import RevocationList
from sidecar.errors import Reason
from sidecar.jose.b64 import b64url_decode, b64url_encode
from sidecar.jose.rfc7515_jws import sign_compact

Build = Callable[[Harness], Decision]

#: Written out rather than computed with ``status_for``, so the test checks the mapping.
STATUS = {
    Reason.POLICY_DENIED: 403,
    Reason.REPLAY_STORE_UNAVAILABLE: 503,
    Reason.PROOF_PREDATES_RESTART: 503,
}


@dataclass(frozen=True)
class Case:
    id: str
    reason: Reason
    build: Build
    #: Expected first challenge scheme in WWW-Authenticate (None: no such header).
    scheme: str | None = "DPoP"
    #: Expected ``error=`` parameter (None: no error parameter).
    error: str | None = "invalid_token"


# -- helpers to build one broken request ----------------------------------------------------


def dpop(
    h: Harness, token: str, *, path: str = "/orders", method: str = "GET", **kw: Any
) -> Decision:
    return h.decide(h.dpop_request(token=token, path=path, method=method, **kw))


def with_proof(
    h: Harness, proof: str, *, token: str, method: str = "GET", path: str = "/orders"
) -> Decision:
    return h.decide(
        view(method=method, path=path, headers={"authorization": f"DPoP {token}", "dpop": proof})
    )


def signed_by_another_key(h: Harness, token: str) -> Decision:
    """Everything right (one token for ath and the header) except the signature's key."""
    return with_proof(h, h.manual_proof(token, key=ec_key(55)), token=token)


def flip(segment: str, at: int = 5) -> str:
    raw = bytearray(b64url_decode(segment))
    raw[at] ^= 0x01
    return b64url_encode(bytes(raw))


def tampered_signature(h: Harness) -> Decision:
    head, payload, sig = h.token().split(".")
    return dpop(h, f"{head}.{payload}.{flip(sig)}")


def tampered_payload(h: Harness) -> Decision:
    head, _, sig = h.token().split(".")
    claims = h.issuer.claims(jkt=h.client.thumbprint, sub="spiffe://demo.local/ns/shop/sa/admin")
    return dpop(h, f"{head}.{encode_segment(claims)}.{sig}")


def signed_by_another_key_same_kid(h: Harness) -> Decision:
    claims = h.issuer.claims(jkt=h.client.thumbprint)
    token = sign_compact(ec_key(12345), "ES256", claims, header={"typ": "at+jwt", "kid": "es-1"})
    return dpop(h, token)


def alg_none(h: Harness, *, signature: bytes) -> Decision:
    hdr = {"alg": "none", "typ": "at+jwt", "kid": h.issuer.kid}
    claims = h.issuer.claims(jkt=h.client.thumbprint)
    return dpop(h, unsigned_jws(hdr, claims, signature))


def alg_none_empty_signature(h: Harness) -> Decision:
    hdr = {"alg": "none", "typ": "at+jwt", "kid": h.issuer.kid}
    token = f"{encode_segment(hdr)}.{encode_segment(h.issuer.claims(jkt=h.client.thumbprint))}."
    return dpop(h, token)


def hs256_public_key_pem(h: Harness) -> Decision:
    pem = h.issuer.private_key.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    hdr = {"alg": "HS256", "typ": "at+jwt", "kid": h.issuer.kid}
    return dpop(h, hs256_token(pem, hdr, h.issuer.claims(jkt=h.client.thumbprint)))


def hs256_public_jwk(h: Harness) -> Decision:
    secret = json.dumps(h.issuer.jwk, separators=(",", ":")).encode()
    hdr = {"alg": "HS256", "typ": "at+jwt", "kid": h.issuer.kid}
    return dpop(h, hs256_token(secret, hdr, h.issuer.claims(jkt=h.client.thumbprint)))


def rs256_from_es256_issuer(h: Harness) -> Decision:
    claims = h.issuer.claims(jkt=h.client.thumbprint)  # iss is the ES256-only issuer
    token = sign_compact(rsa_key("attacker"), "RS256", claims, header={"typ": "at+jwt"})
    return dpop(h, token)


def json_array_payload(h: Harness) -> Decision:
    token = sign_compact(h.issuer.private_key, "ES256", {}, header={"typ": "at+jwt"})
    head, _, _ = token.split(".")
    return dpop(h, f"{head}.{b64url_encode(b'[1,2]')}.AAAA")


def replayed(h: Harness) -> Decision:
    request = h.dpop_request()
    assert isinstance(h.decide(request), Allow)
    return h.decide(request)


def replay_store_full(h: Harness) -> Decision:
    h = make_harness(issuer=h.issuer, replay=InMemoryReplayStore(capacity=1, epoch=NOW - 3600))
    assert isinstance(h.decide(h.dpop_request()), Allow)
    return h.decide(h.dpop_request())  # a fresh proof: nothing to evict, so fail closed


def store_restarted(h: Harness) -> Decision:
    # The store started 2 s ago: a proof of now may have been used 3 s before its iat.
    h = make_harness(issuer=h.issuer, replay=InMemoryReplayStore(epoch=NOW - 2))
    return h.decide(h.dpop_request())


def revoked(
    *, subjects: frozenset[str] = frozenset(), jtis: frozenset[str] = frozenset()
) -> Harness:
    # Filled before the Authorizer is built: an empty RevocationList handed to the Authorizer
    # is silently replaced (see test_revocation_list_updated_after_start_is_honoured).
    revocations = RevocationList()
    revocations.replace(subjects=subjects, jtis=jtis, version="1")
    return make_harness(revocations=revocations)


def revoked_subject(h: Harness) -> Decision:
    h = revoked(subjects=frozenset({FRONTEND}))
    return h.decide(h.dpop_request())


def revoked_jti(h: Harness) -> Decision:
    h = revoked(jtis=frozenset({"stolen-jti"}))
    assert isinstance(dpop(h, h.token(jti="another-jti")), Allow)
    return dpop(h, h.token(jti="stolen-jti"))


def other_secret_nonce(h: Harness) -> Decision:
    foreign = NonceService(b"another-replica-group-secret!!", window=60.0).issue(NOW)
    return h.decide(h.dpop_request(path="/pay", nonce=foreign))


def expired_bearer(h: Harness) -> Decision:
    return h.decide(h.bearer_request(token=h.token(bound=False, now=NOW - 400)))


# -- the cases ------------------------------------------------------------------------------

P = "invalid_dpop_proof"
N = "use_dpop_nonce"

CASES = [
    # missing_credentials: no error parameter, just the challenge(s)
    Case(
        "no-authorization",
        Reason.MISSING_CREDENTIALS,
        lambda h: h.decide(view(headers={})),
        error=None,
    ),
    Case(
        "basic-scheme",
        Reason.MISSING_CREDENTIALS,
        lambda h: h.decide(view(headers={"authorization": "Basic Zm9vOmJhcg=="})),
        error=None,
    ),
    Case(
        "no-authorization-on-bearer-route",
        Reason.MISSING_CREDENTIALS,
        lambda h: h.decide(view(path="/public/x", headers={})),
        scheme="Bearer",
        error=None,
    ),
    # malformed_token
    Case("not-a-jwt", Reason.MALFORMED_TOKEN, lambda h: dpop(h, "not-a-jwt")),
    Case(
        "two-authorization-headers-merged",
        Reason.MALFORMED_TOKEN,
        lambda h: h.decide(
            view(
                headers={
                    "authorization": f"DPoP {h.token()}, DPoP {h.token()}",
                    "dpop": h.proof(h.token()),
                }
            )
        ),
    ),
    Case("json-array-payload", Reason.MALFORMED_TOKEN, json_array_payload),
    Case("exp-as-string", Reason.MALFORMED_TOKEN, lambda h: dpop(h, h.token(exp="tomorrow"))),
    Case("exp-as-bool", Reason.MALFORMED_TOKEN, lambda h: dpop(h, h.token(exp=True))),
    Case("aud-as-number", Reason.MALFORMED_TOKEN, lambda h: dpop(h, h.token(aud=42))),
    Case("sub-missing", Reason.MALFORMED_TOKEN, lambda h: dpop(h, h.token(sub=DROP))),
    Case(
        "cnf-jkt-not-a-thumbprint", Reason.MALFORMED_TOKEN, lambda h: dpop(h, h.token(jkt="short"))
    ),
    Case("oversize-token", Reason.MALFORMED_TOKEN, lambda h: dpop(h, h.token(pad="x" * 9000))),
    # alg_not_allowed
    Case("alg-none", Reason.ALG_NOT_ALLOWED, alg_none_empty_signature),
    Case(
        "alg-none-with-a-signature",
        Reason.ALG_NOT_ALLOWED,
        lambda h: alg_none(h, signature=b"\x00" * 8),
    ),
    Case("hs256-with-public-key-pem", Reason.ALG_NOT_ALLOWED, hs256_public_key_pem),
    Case("hs256-with-public-jwk", Reason.ALG_NOT_ALLOWED, hs256_public_jwk),
    Case("rs256-from-es256-issuer", Reason.ALG_NOT_ALLOWED, rs256_from_es256_issuer),
    # unknown_key
    Case("unknown-kid", Reason.UNKNOWN_KEY, lambda h: dpop(h, h.token(kid="es-rotated-away"))),
    # bad_signature
    Case("tampered-signature", Reason.BAD_SIGNATURE, tampered_signature),
    Case("tampered-payload", Reason.BAD_SIGNATURE, tampered_payload),
    Case("other-key-same-kid", Reason.BAD_SIGNATURE, signed_by_another_key_same_kid),
    # untrusted_issuer
    Case(
        "untrusted-iss",
        Reason.UNTRUSTED_ISSUER,
        lambda h: dpop(h, h.token(iss="https://evil.example")),
    ),
    Case(
        "iss-with-trailing-slash",
        Reason.UNTRUSTED_ISSUER,
        lambda h: dpop(h, h.token(iss=ES_ISSUER + "/")),
    ),
    # trust_domain_mismatch: a JWT-SVID naming another trust domain, signed by this one's key
    Case(
        "svid-sub-of-another-trust-domain",
        Reason.TRUST_DOMAIN_MISMATCH,
        lambda h: spiffe_harness().decide(
            h.bearer_request(token=svid(sub="spiffe://partner.example/ns/shop/sa/frontend"))
        ),
        scheme="Bearer",
    ),
    # wrong_type
    Case("typ-JWT", Reason.WRONG_TYPE, lambda h: dpop(h, h.token(typ="JWT"))),
    Case("typ-missing", Reason.WRONG_TYPE, lambda h: dpop(h, h.token(typ=None))),
    Case("typ-dpop+jwt", Reason.WRONG_TYPE, lambda h: dpop(h, h.token(typ="dpop+jwt"))),
    # wrong_audience
    Case(
        "wrong-aud",
        Reason.WRONG_AUDIENCE,
        lambda h: dpop(h, h.token(aud="spiffe://demo.local/ns/shop/sa/payments")),
    ),
    Case(
        "aud-list-without-ours",
        Reason.WRONG_AUDIENCE,
        lambda h: dpop(h, h.token(aud=["a", AUDIENCE + "/x"])),
    ),
    # expired / not_yet_valid (leeway is 5 s)
    Case(
        "expired-beyond-leeway", Reason.EXPIRED, lambda h: dpop(h, h.token(now=NOW - 306))
    ),  # exp = NOW - 6
    Case("expired-bearer", Reason.EXPIRED, expired_bearer, scheme="Bearer"),
    Case("nbf-in-future", Reason.NOT_YET_VALID, lambda h: dpop(h, h.token(nbf=int(NOW) + 60))),
    Case("iat-in-future", Reason.NOT_YET_VALID, lambda h: dpop(h, h.token(iat=int(NOW) + 60))),
    # proof_missing
    Case(
        "proof-missing",
        Reason.PROOF_MISSING,
        lambda h: h.decide(view(headers={"authorization": f"DPoP {h.token()}"})),
        error=P,
    ),
    # proof_invalid
    Case(
        "two-dpop-headers-merged",
        Reason.PROOF_INVALID,
        lambda h: with_proof(h, f"{h.proof(h.token())}, {h.proof(h.token())}", token=h.token()),
        error=P,
    ),
    Case(
        "proof-not-a-jwt",
        Reason.PROOF_INVALID,
        lambda h: with_proof(h, "garbage", token=h.token()),
        error=P,
    ),
    Case(
        "proof-typ-JWT",
        Reason.PROOF_INVALID,
        lambda h: with_proof(h, h.manual_proof(h.token(), header={"typ": "JWT"}), token=h.token()),
        error=P,
    ),
    Case(
        "proof-hs256",
        Reason.PROOF_INVALID,
        lambda h: with_proof(
            h,
            hs256_token(
                b"k" * 32,
                {"typ": "dpop+jwt", "alg": "HS256", "jwk": h.client.public_jwk},
                {
                    "jti": "j",
                    "htm": "GET",
                    "htu": "https://orders.demo.local/orders",
                    "iat": int(NOW),
                },
            ),
            token=h.token(),
        ),
        error=P,
    ),
    Case(
        "proof-jwk-with-private-d",
        Reason.PROOF_INVALID,
        lambda h: with_proof(
            h,
            h.manual_proof(
                h.token(),
                header={
                    "jwk": {
                        **h.client.public_jwk,
                        "d": b64url_encode(
                            h.client_key.private_numbers().private_value.to_bytes(32, "big")
                        ),
                    }
                },
            ),
            token=h.token(),
        ),
        error=P,
    ),
    Case(
        "proof-signed-by-key-other-than-its-jwk",
        Reason.PROOF_INVALID,
        lambda h: signed_by_another_key(h, h.token()),
        error=P,
    ),
    Case(
        "proof-without-jti",
        Reason.PROOF_INVALID,
        lambda h: with_proof(h, h.manual_proof(h.token(), claims={"jti": DROP}), token=h.token()),
        error=P,
    ),
    # proof_key_mismatch
    Case(
        "proof-by-another-key-than-cnf-jkt",
        Reason.PROOF_KEY_MISMATCH,
        lambda h: dpop(h, h.token(), signer=h.other_client),
        error=P,
    ),
    Case(
        "unbound-token-on-dpop-route",
        Reason.PROOF_KEY_MISMATCH,
        lambda h: dpop(h, h.token(bound=False)),
        error=P,
    ),
    # htm / htu / ath / iat
    Case(
        "htm-mismatch",
        Reason.HTM_MISMATCH,
        lambda h: with_proof(h, h.proof(h.token(), method="POST"), token=h.token()),
        error=P,
    ),
    Case(
        "htm-lower-case",
        Reason.HTM_MISMATCH,
        lambda h: with_proof(h, h.proof(h.token(), method="get"), token=h.token()),
        error=P,
    ),
    Case(
        "htu-other-host",
        Reason.HTU_MISMATCH,
        lambda h: dpop(h, h.token(), url="https://other.demo.local/orders"),
        error=P,
    ),
    Case(
        "htu-other-path",
        Reason.HTU_MISMATCH,
        lambda h: dpop(h, h.token(), url="https://orders.demo.local/orders/42"),
        error=P,
    ),
    Case(
        "htu-other-scheme",
        Reason.HTU_MISMATCH,
        lambda h: dpop(h, h.token(), url="http://orders.demo.local/orders"),
        error=P,
    ),
    Case(
        "htu-other-port",
        Reason.HTU_MISMATCH,
        lambda h: dpop(h, h.token(), url="https://orders.demo.local:8443/orders"),
        error=P,
    ),
    Case(
        "htu-origin-not-an-authority",
        Reason.UNKNOWN_AUTHORITY,
        lambda h: dpop(
            make_harness(authorities=frozenset({"https://orders.demo.local"})),
            h.token(),
            url="https://other.demo.local/orders",
        ),
        error=P,
    ),
    Case(
        "ath-of-another-token",
        Reason.ATH_MISMATCH,
        lambda h: with_proof(h, h.proof(h.token(jti="other")), token=h.token()),
        error=P,
    ),
    Case(
        "ath-missing",
        Reason.ATH_MISMATCH,
        lambda h: with_proof(h, h.proof(None), token=h.token()),
        error=P,
    ),
    Case(
        "iat-too-old", Reason.IAT_OUT_OF_WINDOW, lambda h: dpop(h, h.token(), now=NOW - 61), error=P
    ),
    Case(
        "iat-too-far-in-future",
        Reason.IAT_OUT_OF_WINDOW,
        lambda h: dpop(h, h.token(), now=NOW + 6),
        error=P,
    ),
    # replayed
    Case("same-proof-twice", Reason.REPLAYED, replayed, error=P),
    # nonces (route /pay requires one)
    Case(
        "nonce-missing",
        Reason.NONCE_REQUIRED,
        lambda h: h.decide(h.dpop_request(path="/pay")),
        error=N,
    ),
    Case(
        "nonce-garbage",
        Reason.NONCE_INVALID,
        lambda h: h.decide(h.dpop_request(path="/pay", nonce="not-a-nonce")),
        error=N,
    ),
    Case(
        "nonce-two-windows-old",
        Reason.NONCE_INVALID,
        lambda h: h.decide(h.dpop_request(path="/pay", nonce=h.nonce(NOW - 120))),
        error=N,
    ),
    Case("nonce-from-another-secret", Reason.NONCE_INVALID, other_secret_nonce, error=N),
    # bearer_not_allowed
    Case(
        "dpop-bound-token-as-bearer",
        Reason.BEARER_NOT_ALLOWED,
        lambda h: h.decide(h.bearer_request(token=h.token())),
    ),
    Case(
        "unbound-bearer-on-dpop-route",
        Reason.BEARER_NOT_ALLOWED,
        lambda h: h.decide(h.bearer_request(path="/orders")),
    ),
    # revoked
    Case("revoked-subject", Reason.REVOKED, revoked_subject),
    Case("revoked-jti", Reason.REVOKED, revoked_jti),
    # policy_denied: 403; an authenticated caller gets insufficient_scope (RFC 6750 §3.1),
    # a path refused before any credential is looked at gets no challenge
    Case(
        "forbidden-caller",
        Reason.POLICY_DENIED,
        lambda h: dpop(h, h.token(sub=INTRUDER)),
        error="insufficient_scope",
    ),
    Case(
        "forbidden-method",
        Reason.POLICY_DENIED,
        lambda h: dpop(h, h.token(), method="DELETE"),
        error="insufficient_scope",
    ),
    Case(
        "prefix-is-not-a-string-prefix",
        Reason.POLICY_DENIED,
        lambda h: dpop(h, h.token(), path="/ordersX"),
        error="insufficient_scope",
    ),
    Case(
        "dot-dot-segment",
        Reason.POLICY_DENIED,
        lambda h: dpop(h, h.token(), path="/public/../admin"),
        scheme=None,
        error=None,
    ),
    Case(
        "encoded-dot-dot",
        Reason.POLICY_DENIED,
        lambda h: dpop(h, h.token(), path="/%2e%2e/x"),
        scheme=None,
        error=None,
    ),
    Case(
        "encoded-slash",
        Reason.POLICY_DENIED,
        lambda h: dpop(h, h.token(), path="/orders%2F..%2Fadmin"),
        scheme=None,
        error=None,
    ),
    Case(
        "ambiguous-path-without-credentials",
        Reason.POLICY_DENIED,
        lambda h: h.decide(view(path="/public/./x", headers={})),
        scheme=None,
        error=None,
    ),
    # replay_store_unavailable: 503 with Retry-After, no challenge
    Case(
        "replay-store-full",
        Reason.REPLAY_STORE_UNAVAILABLE,
        replay_store_full,
        scheme=None,
        error=None,
    ),
    # proof_predates_restart: 503 with Retry-After (when a new proof passes), no challenge
    Case(
        "proof-of-now-after-store-restart",
        Reason.PROOF_PREDATES_RESTART,
        store_restarted,
        scheme=None,
        error=None,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_deny(h: Harness, case: Case) -> None:
    decision = case.build(h)
    assert isinstance(decision, Deny), f"expected a deny, got {decision!r}"
    assert decision.reason is case.reason, decision.detail
    assert decision.status == STATUS.get(case.reason, 401)
    assert header(decision, "x-authz-reason") == case.reason.value
    body = json.loads(decision.body)
    assert body["reason"] == case.reason.value

    www = header(decision, "www-authenticate")
    if case.scheme is None:
        assert www is None
    else:
        assert www is not None
        assert challenge_scheme(www) == case.scheme
        assert challenge_error(www) == case.error
        if case.scheme == "DPoP":
            assert 'algs="' in www  # RFC 9449 §7.1: advertise the accepted algorithms

    nonce = header(decision, "dpop-nonce")
    if case.reason in (Reason.NONCE_REQUIRED, Reason.NONCE_INVALID):
        assert nonce is not None and h.nonces.check(nonce, NOW)
    else:
        assert nonce is None

    if case.reason is Reason.REPLAY_STORE_UNAVAILABLE:
        assert header(decision, "retry-after") is not None
    if case.reason is Reason.PROOF_PREDATES_RESTART:
        assert header(decision, "retry-after") == "4"  # epoch + future_leeway 5 + 1 - now
    # A deny never carries identity headers.
    assert not any(k.startswith("x-workload-") for k, _ in decision.headers)


def test_every_reason_has_a_case() -> None:
    covered = {c.reason for c in CASES}
    assert covered == set(Reason) - {Reason.INTERNAL_ERROR}


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def test_evaluate_and_decide_agree_on_denies(h: Harness) -> None:
    """evaluate() is decide() without the replay round trip: same deny for the same request."""
    request = h.dpop_request(token=h.token(typ="JWT"))
    first = h.evaluate(request)
    assert isinstance(first, Deny)
    assert h.decide(request) == first


def test_internal_error_is_only_the_transports_guard(h: Harness) -> None:
    deny = h.authz.internal_error("boom")
    assert deny.status == 500
    assert deny.reason is Reason.INTERNAL_ERROR
    assert header(deny, "x-authz-reason") == "internal_error"


@pytest.mark.parametrize(
    "value",
    ["Bearer tok1, Bearer tok2", "Bearer ", "Bearer " + "a" * 9000],
    ids=["merged", "empty", "oversize"],
)
def test_rejected_bearer_header_gets_a_bearer_challenge(h: Harness, value: str) -> None:
    decision = h.decide(view(path="/public/x", headers={"authorization": value}))
    assert isinstance(decision, Deny) and decision.reason is Reason.MALFORMED_TOKEN
    www = header(decision, "www-authenticate")
    assert www is not None and challenge_scheme(www) == "Bearer"


def test_bearer_presented_token_failure_gets_a_bearer_challenge(h: Harness) -> None:
    decision = h.decide(view(path="/public/x", headers={"authorization": "Bearer not-a-jwt"}))
    assert isinstance(decision, Deny) and decision.reason is Reason.MALFORMED_TOKEN
    www = header(decision, "www-authenticate")
    assert www is not None and challenge_scheme(www) == "Bearer"
    assert challenge_error(www) == "invalid_token"


def test_revocation_list_updated_after_start_is_honoured(h: Harness) -> None:
    h.revocations.replace(subjects=frozenset({FRONTEND}), jtis=frozenset(), version="2")
    decision = h.decide(h.dpop_request())
    assert isinstance(decision, Deny) and decision.reason is Reason.REVOKED
