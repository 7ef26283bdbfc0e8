"""Log forging (CWE-117): client strings with control characters are refused where they are
claims, and every client value that reaches a log line is escaped (logfmt, one line)."""

from __future__ import annotations

from typing import Any

import pytest
from factory import Harness, make_harness

from sidecar.authz.decision import Allow, Deny, Identity
from sidecar.authz.guard import decision_fields
from sidecar.errors import Reason
from sidecar.observability.logsafe import MAX_VALUE, logfmt, logfmt_value

FORGED = "j1\nINFO sidecar.authz.grpc_server deny reason=forged"


@pytest.mark.parametrize(
    ("value", "logged"),
    [
        ("spiffe://demo.local/ns/shop/sa/a", "spiffe://demo.local/ns/shop/sa/a"),
        ("a b", '"a b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("k=v", '"k=v"'),
        ("back\\slash", '"back\\\\slash"'),
        ("", '""'),
        ("x\r\ny", '"x\\x0d\\x0ay"'),
        ("\x1b[31mred", '"\\x1b[31mred"'),
        ("del\x7f", '"del\\x7f"'),
        ("caf\u00e9", '"caf\\xe9"'),
        ("line\u2028sep", '"line\\u2028sep"'),
        ("\U0001f600", '"\\U0001f600"'),
        (42, "42"),
    ],
)
def test_logfmt_value(value: object, logged: str) -> None:
    assert logfmt_value(value) == logged


def test_logfmt_value_is_bounded_and_says_so() -> None:
    out = logfmt_value("a" * (MAX_VALUE + 100))
    assert out == '"' + "a" * MAX_VALUE + '..."'


def test_logfmt_pairs() -> None:
    assert logfmt([("sub", "s"), ("detail", "two words")]) == 'sub=s detail="two words"'


def test_deny_log_fields_escape_every_client_value() -> None:
    meta = {"sub": "s\nub", "token_jti": FORGED, "proof_jti": "p\r", "kid": "k\x00"}
    deny = Deny(401, Reason.PROOF_INVALID, "detail\nINFO forged", (), "{}", meta)
    line = logfmt(decision_fields(deny, None, "grpc"))
    assert "\n" not in line and "\r" not in line and "\x00" not in line
    assert 'token_jti="j1\\x0aINFO sidecar.authz.grpc_server deny reason=forged"' in line
    assert 'detail="detail\\x0aINFO forged"' in line
    assert line.startswith("result=deny reason=proof_invalid status=401 transport=grpc sub=")


def test_allow_log_fields_escape_too() -> None:
    identity = Identity("s", "i", "dpop", None, None, None, "r")
    allow = Allow(identity, (), (), (), {"sub": "a b\nc", "kid": "k"})
    line = logfmt(decision_fields(allow, None, "http"))
    assert line == 'result=allow transport=http sub="a b\\x0ac" kid=k'


@pytest.fixture
def h() -> Harness:
    return make_harness()


@pytest.mark.parametrize(
    "claims",
    [
        {"jti": FORGED},
        {"jti": "tab\tjti"},
        {"jti": "c1\x85jti"},  # a C1 control (NEL)
        {"nonce": "n\nonce"},
        {"htm": "GET\n"},
    ],
    ids=["jti-newline", "jti-tab", "jti-c1", "nonce", "htm"],
)
def test_proof_claims_with_control_characters_are_refused(
    h: Harness, claims: dict[str, str]
) -> None:
    token = h.token()
    proof = h.manual_proof(token, claims=claims)
    request = h.dpop_request(token=token, headers={"dpop": proof})
    deny = h.decide(request)
    assert isinstance(deny, Deny) and deny.reason is Reason.PROOF_INVALID, deny
    assert "printable ASCII" in deny.detail


def test_token_kid_with_control_characters_is_refused(h: Harness) -> None:
    token = h.issuer.token(kid="es-1\nforged", jkt=h.client.thumbprint)
    deny = h.decide(h.dpop_request(token=token))
    assert isinstance(deny, Deny) and deny.reason is Reason.MALFORMED_TOKEN


# -- non-ASCII claims (THREAT_MODEL.md: refused) ---------------------------------------------


@pytest.mark.parametrize(
    "claims",
    [
        {"jti": "j\u00e9ti"},
        {"htu": "https://orders.demo.local/\u00f6rders"},
        {"nonce": "n\u0430nce"},  # Cyrillic a
    ],
    ids=["jti", "htu", "nonce"],
)
def test_proof_claims_with_non_ascii_are_refused(h: Harness, claims: dict[str, str]) -> None:
    token = h.token()
    deny = h.decide(
        h.dpop_request(token=token, headers={"dpop": h.manual_proof(token, claims=claims)})
    )
    assert isinstance(deny, Deny) and deny.reason is Reason.PROOF_INVALID, deny


@pytest.mark.parametrize(
    "claim",
    [
        {"sub": "spiffe://demo.local/ns/shop/sa/fr\u043entend"},  # Cyrillic o: a homoglyph
        {"jti": "t\u00f6ken"},
        {"client_id": "fr\u00f6ntend"},
        {"iss": "https://issuer.demo.local/\u00e9"},
    ],
    ids=["sub", "jti", "client_id", "iss"],
)
def test_token_claims_with_non_ascii_are_refused(h: Harness, claim: dict[str, Any]) -> None:
    token = h.issuer.token(jkt=h.client.thumbprint, **claim)
    deny = h.decide(h.dpop_request(token=token))
    assert isinstance(deny, Deny) and deny.reason is Reason.MALFORMED_TOKEN, deny
