"""Token requests and responses (sans-IO): RFC 8693 forms, RFC 6749 §5.1/§5.2 answers, the
RFC 9449 §8 nonce demand, and what we refuse to keep."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.identity.errors import IdentityError
from sidecar.identity.rfc8693_exchange import (
    TOKEN_EXCHANGE_GRANT,
    attestation_form,
    error_from_response,
    exchange_form,
    fresh_nonce,
    nonce_challenge,
    parse_token_response,
)
from sidecar.identity.token import IssuedToken, unverified_claims
from sidecar.jose.rfc7515_jws import sign_compact

NOW = 1_700_000_000.0
AUD = "spiffe://demo.local/ns/shop/sa/orders"
JKT = "our-thumbprint"
KEY = ec.derive_private_key(7, ec.SECP256R1())


def jwt(**claims: Any) -> str:
    return sign_compact(KEY, "ES256", claims, header={"typ": "at+jwt"})


def answer(doc: object, status: int = 200, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return status, headers, json.dumps(doc).encode()


def parse(status: int, headers: dict[str, str], body: bytes, **kw: Any) -> IssuedToken:
    kw.setdefault("require_dpop", True)
    return parse_token_response(
        status, headers, body, audience=AUD, requested_at=NOW, expected_jkt=JKT, **kw
    )


def test_exchange_form_repeats_audience_and_names_the_grant() -> None:
    form = exchange_form(subject_token="sa.jwt.x", audiences=["a", "b"], scope="read")
    assert form[0] == ("grant_type", TOKEN_EXCHANGE_GRANT)
    assert ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt") in form
    assert [v for k, v in form if k == "audience"] == ["a", "b"]
    assert ("scope", "read") in form
    assert attestation_form([AUD]) == (("audience", AUD),)


def test_dpop_token_response() -> None:
    at = jwt(sub="spiffe://x", aud=AUD, exp=NOW + 300, cnf={"jkt": JKT})
    tok = parse(
        *answer(
            {
                "access_token": at,
                "token_type": "DPoP",
                "expires_in": 300,
                "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            }
        )
    )
    assert tok.token == at and tok.is_dpop and tok.authorization == f"DPoP {at}"
    assert tok.expires_at == NOW + 300 and tok.issued_at == NOW
    assert tok.claims is not None and tok.claims["sub"] == "spiffe://x"
    assert at not in repr(tok), "a token must never show up in a repr (logs)"


def test_token_type_is_case_insensitive() -> None:
    tok = parse(*answer({"access_token": "opaque-token", "token_type": "dpop", "expires_in": 60}))
    assert tok.token_type == "DPoP" and tok.claims is None


def test_earlier_exp_claim_wins_over_expires_in() -> None:
    at = jwt(exp=NOW + 100, cnf={"jkt": JKT})
    tok = parse(*answer({"access_token": at, "token_type": "DPoP", "expires_in": 600}))
    assert tok.expires_at == NOW + 100


def test_exp_claim_alone_gives_the_expiry() -> None:
    at = jwt(exp=NOW + 100)
    assert parse(*answer({"access_token": at, "token_type": "DPoP"})).expires_at == NOW + 100


@pytest.mark.parametrize(
    ("doc", "code"),
    [
        ({"token_type": "DPoP", "expires_in": 60}, "bad_response"),
        ({"access_token": "x", "token_type": "mac", "expires_in": 60}, "bad_response"),
        ({"access_token": "opaque", "token_type": "DPoP"}, "bad_response"),  # no expiry at all
        ({"access_token": "x", "token_type": "DPoP", "expires_in": -5}, "bad_response"),
        ({"access_token": "x", "token_type": "DPoP", "expires_in": "60"}, "bad_response"),
        ({"access_token": "a b", "token_type": "DPoP", "expires_in": 60}, "bad_response"),
        (
            {"access_token": "x\r\nX-Evil: 1", "token_type": "DPoP", "expires_in": 60},
            "bad_response",
        ),
        ({"access_token": "x", "token_type": "Bearer", "expires_in": 60}, "binding_mismatch"),
    ],
)
def test_unusable_responses_are_refused(doc: dict[str, Any], code: str) -> None:
    with pytest.raises(IdentityError) as info:
        parse(*answer(doc))
    assert info.value.code == code


def test_bearer_accepted_only_when_dpop_is_not_required() -> None:
    tok = parse(
        *answer({"access_token": "x", "token_type": "Bearer", "expires_in": 60}), require_dpop=False
    )
    assert tok.token_type == "Bearer" and tok.authorization == "Bearer x"


def test_token_bound_to_another_key_is_refused() -> None:
    at = jwt(exp=NOW + 100, cnf={"jkt": "someone-else"})
    with pytest.raises(IdentityError) as info:
        parse(*answer({"access_token": at, "token_type": "DPoP", "expires_in": 60}))
    assert info.value.code == "binding_mismatch" and not info.value.retryable


@pytest.mark.parametrize(
    ("status", "doc", "code", "retryable"),
    [
        (
            400,
            {"error": "invalid_target", "error_description": "no such audience"},
            "invalid_target",
            False,
        ),
        (403, {"error": "access_denied"}, "access_denied", False),
        (400, {"error": "invalid_grant"}, "invalid_grant", True),  # a rotated SA token helps
        (400, {"error": "invalid_dpop_proof"}, "invalid_dpop_proof", True),
        (401, {"error": "invalid_client"}, "invalid_client", False),
        (500, {"error": "server_error"}, "server_error", True),
        (503, "not json", "server_error", True),
        (429, {}, "temporarily_unavailable", True),
        (404, "nope", "bad_response", False),
    ],
)
def test_error_responses_keep_the_issuer_code(
    status: int, doc: object, code: str, retryable: bool
) -> None:
    with pytest.raises(IdentityError) as info:
        parse(*answer(doc, status))
    err = info.value
    assert (err.code, err.retryable, err.status) == (code, retryable, status)


def test_error_description_is_sanitized_and_retry_after_read() -> None:
    body = json.dumps({"error": "temporarily_unavailable", "error_description": "x\x00y" * 200})
    err = error_from_response(400, {"Retry-After": "12"}, body.encode())
    assert err.code == "temporarily_unavailable" and err.retry_after == 12.0
    assert "\x00" not in err.detail and len(err.detail) <= 200


def test_nonce_challenge_from_an_authorization_server() -> None:
    body = json.dumps({"error": "use_dpop_nonce"}).encode()
    assert nonce_challenge(400, {"DPoP-Nonce": "n-1"}, body) == "n-1"
    assert nonce_challenge(400, {"dpop-nonce": "n-1"}, body) == "n-1"
    # The resource-server style challenge is honoured too.
    www = {"WWW-Authenticate": 'DPoP error="use_dpop_nonce"', "DPoP-Nonce": "n-2"}
    assert nonce_challenge(401, www, b"") == "n-2"
    # No nonce header, another error, or a malformed nonce: no challenge.
    assert nonce_challenge(400, {}, body) is None
    assert nonce_challenge(400, {"DPoP-Nonce": "n"}, b'{"error":"invalid_grant"}') is None
    assert nonce_challenge(400, {"DPoP-Nonce": 'bad"nonce'}, body) is None
    assert fresh_nonce({"DPoP-Nonce": "n-3"}) == "n-3"


def test_unverified_claims_of_garbage_is_none() -> None:
    assert unverified_claims("opaque") is None
    assert unverified_claims("a.b.c") is None
    assert unverified_claims(jwt(sub="x")) == {"sub": "x"}
