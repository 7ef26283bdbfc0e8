"""Egress ``auth: wimse``: configuration (errors naming the key), the WIT answer of the
issuer (bound to our key or refused), and the headers a forwarded request gets — verified by
the same WIT/WPT verifiers the ingress uses."""

from __future__ import annotations

import json
from typing import Any

import pytest
from factory import ec_key
from multidict import CIMultiDict
from test_wimse_jose import Bundle

from sidecar.egress.config import parse_egress_config
from sidecar.egress.headers import request_headers
from sidecar.egress.wimse import STRIPPED, WimseUpstream, add_credentials, check_attestor
from sidecar.errors import AuthError, ConfigError, Reason
from sidecar.identity.errors import IdentityError
from sidecar.identity.key import EgressProofSigner
from sidecar.identity.rfc8693_exchange import (
    WIT_AUDIENCE,
    attestation_form,
    exchange_form,
    parse_token_response,
)
from sidecar.jose.rfc7517_jwk import import_public_jwk, public_jwk_dict
from sidecar.jose.wimse_wit import (
    WIT_TOKEN_TYPE,
    WitPolicy,
    issue_wit,
    verify_wit,
    workload_public_jwk,
)
from sidecar.jose.wimse_wpt import WptPolicy, verify_wpt

NOW = 1_800_000_000.0
SUB = "spiffe://demo.local/ns/shop/sa/frontend"
URL = "http://orders.demo.local:8080/orders/42"
ISSUER = ec_key(901)
SIGNER = EgressProofSigner(ec_key(902))  # the sidecar's in-memory key


BUNDLE = Bundle({"demo.local": [import_public_jwk(public_jwk_dict(ISSUER, kid="k1"))]})


def wit_for(key: Any = SIGNER._ec_key) -> str:
    return issue_wit(
        ISSUER,
        alg="ES256",
        kid="k1",
        subject=SUB,
        workload_jwk=workload_public_jwk(key, "ES256"),
        now=NOW,
        lifetime=3600,
    )


WIT = wit_for()


def upstream(**over: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "name": "orders",
        "listen": "127.0.0.1:15002",
        "upstream": "http://orders.demo.local:8080",
        "auth": "wimse",
    }
    item.update(over)
    return {"upstreams": [item]}


# -- configuration -----------------------------------------------------------------------------


def test_wimse_upstream_defaults_and_the_wit_slot() -> None:
    cfg = parse_egress_config(
        {
            "upstreams": [
                upstream()["upstreams"][0],
                {
                    "name": "pay",
                    "listen": "127.0.0.1:15003",
                    "upstream": "http://p:1",
                    "audience": "spiffe://demo.local/pay",
                },
            ]
        }
    )
    target = cfg.upstreams[0].target
    assert target.wimse == WimseUpstream("authorization", 30.0, ())
    assert target.audience == "" and target.token_key == WIT_AUDIENCE
    assert cfg.upstreams[1].target.wimse is None
    # The WIT is prefetched like an access token; listed once however many upstreams use it.
    assert cfg.audiences == [WIT_AUDIENCE, "spiffe://demo.local/pay"]
    assert cfg.wimse_keys == ["egress.upstreams[0]"]


def test_wimse_options_and_forward_proxy_destinations() -> None:
    cfg = parse_egress_config(
        {
            **upstream(
                wimse={
                    "proof_header": "workload-proof-token",
                    "proof_lifetime": 10,
                    "other_tokens": ["X-Partner-Token"],
                }
            ),
            "forward_proxy": {
                "listen": "127.0.0.1:15080",
                "destinations": [{"match": "orders.shop", "auth": "wimse"}],
            },
        }
    )
    assert cfg.upstreams[0].target.wimse == WimseUpstream(
        "workload-proof-token", 10.0, ("x-partner-token",)
    )
    assert cfg.wimse_keys == ["egress.upstreams[0]", "egress.forward_proxy.destinations[0]"]
    (dest,) = cfg.forward_proxy.destinations.values()  # type: ignore[union-attr]
    assert dest.target.origin == "" and dest.target.wimse == WimseUpstream()


@pytest.mark.parametrize(
    ("over", "key"),
    [
        ({"audience": "spiffe://x/y"}, "egress.upstreams[0].audience"),
        ({"on_existing_authorization": "keep"}, "egress.upstreams[0].on_existing_authorization"),
        ({"auth": "dpop"}, "egress.upstreams[0].auth"),
        ({"auth": "token", "audience": "a", "wimse": {}}, "egress.upstreams[0].wimse"),
        ({"wimse": {"proof_header": "dpop"}}, "egress.upstreams[0].wimse.proof_header"),
        ({"wimse": {"proof_lifetime": 301}}, "egress.upstreams[0].wimse.proof_lifetime"),
        ({"wimse": {"proof_lifetime": 0}}, "egress.upstreams[0].wimse.proof_lifetime"),
        ({"wimse": {"carriage": "-01"}}, "egress.upstreams[0].wimse.carriage"),
        ({"wimse": {"other_tokens": ["Authorization"]}}, "egress.upstreams[0].wimse.other_tokens"),
        ({"wimse": {"other_tokens": ["txn-token"]}}, "egress.upstreams[0].wimse.other_tokens"),
        ({"wimse": {"other_tokens": ["bad name"]}}, "egress.upstreams[0].wimse.other_tokens"),
    ],
)
def test_wimse_config_errors_name_the_key(over: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_egress_config(upstream(**over))
    assert err.value.key == key


def test_an_attestor_without_wits_is_refused_for_wimse_upstreams() -> None:
    check_attestor(["egress.upstreams[0]"], "unix")
    check_attestor(["egress.upstreams[0]"], "k8s")
    check_attestor([], "spiffe")
    for kind in ("spiffe", "file"):
        with pytest.raises(ConfigError) as err:
            check_attestor(["egress.upstreams[0]"], kind)
        assert err.value.key == "egress.upstreams[0].auth"
        assert "unix or k8s" in str(err.value)


# -- the issuer's answer -------------------------------------------------------------------------


def test_the_wit_is_asked_for_by_type_without_an_audience() -> None:
    assert attestation_form([WIT_AUDIENCE]) == (("requested_token_type", WIT_TOKEN_TYPE),)
    form = exchange_form(subject_token="t", audiences=[], requested_token_type=WIT_TOKEN_TYPE)
    assert ("requested_token_type", WIT_TOKEN_TYPE) in form
    assert not [v for k, v in form if k == "audience"]


def _answer(token: str, **over: Any) -> bytes:
    doc = {
        "access_token": token,
        "issued_token_type": WIT_TOKEN_TYPE,
        "token_type": "N_A",
        "expires_in": 3600,
    }
    doc.update(over)
    return json.dumps(doc).encode()


def _parse(body: bytes) -> Any:
    return parse_token_response(
        200,
        {},
        body,
        audience=WIT_AUDIENCE,
        requested_at=NOW,
        expected_jkt=SIGNER.thumbprint,
        require_dpop=True,
        wit=True,
    )


def test_a_wit_bound_to_our_key_is_taken() -> None:
    token = _parse(_answer(wit_for()))
    assert token.token_type == "WIT" and not token.is_dpop
    assert token.expires_at == NOW + 3600 and token.claims["sub"] == SUB


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (_answer(wit_for(ec_key(903))), "binding_mismatch"),  # cnf.jwk: another key
        (_answer(wit_for(), token_type="DPoP"), "bad_response"),  # an access token
        (_answer(wit_for(), issued_token_type="urn:x"), "bad_response"),
    ],
)
def test_a_wit_answer_that_is_not_ours_is_refused(body: bytes, code: str) -> None:
    with pytest.raises(IdentityError) as err:
        _parse(body)
    assert err.value.code == code


def test_an_access_token_answer_is_never_read_as_a_wit() -> None:
    """Without ``wit`` an N_A answer is refused: a WIT is never sent as an access token."""
    with pytest.raises(IdentityError):
        parse_token_response(
            200,
            {},
            _answer(wit_for()),
            audience="a",
            requested_at=NOW,
            expected_jkt=SIGNER.thumbprint,
            require_dpop=True,
        )


# -- what goes on the wire -----------------------------------------------------------------------


def _outgoing(app_headers: list[tuple[str, str]], settings: WimseUpstream) -> CIMultiDict[str]:
    headers = request_headers(app_headers, drop_credentials=True, credentials=STRIPPED)
    add_credentials(
        headers, settings=settings, signer=SIGNER.wpt_signer(), wit=WIT, url=URL, now=NOW
    )
    return headers


APP_FORGERIES = [
    ("Host", "orders"),
    ("Authorization", "Bearer app-token"),
    ("DPoP", "app-proof"),
    ("Workload-Identity-Token", "app.wit.x"),
    ("Workload-Proof-Token", "app.wpt.x"),
    ("X-Partner-Token", " partner-1 "),
    ("Txn-Token", "txn-1"),
]


def _verify(headers: CIMultiDict[str], proof: str, policy: WptPolicy) -> Any:
    wit = verify_wit(
        headers["Workload-Identity-Token"], keys=BUNDLE, now=NOW, policy=WitPolicy(svid=True)
    )
    lower = {k.lower(): v for k, v in headers.items()}
    return wit, verify_wpt(proof, wit=wit, now=NOW, policy=policy, url=URL, headers=lower)


def test_draft_02_carriage_replaces_whatever_the_app_sent() -> None:
    headers = _outgoing(APP_FORGERIES, WimseUpstream(other_tokens=("x-partner-token",)))
    assert headers.getall("Workload-Identity-Token") == [WIT]
    assert "Workload-Proof-Token" not in headers and "DPoP" not in headers
    (auth,) = headers.getall("Authorization")
    scheme, _, proof = auth.partition(" ")
    assert scheme == "WPT"
    policy = WptPolicy(other_tokens=frozenset({"x-partner-token"}))
    wit, wpt = _verify(headers, proof, policy)
    assert wit.subject == SUB and wit.key.thumbprint == SIGNER.thumbprint
    assert len(wpt.jti) >= 22 and wpt.exp == NOW + 30  # 128 random bits; 30 s ahead
    claims = json.loads(_payload(proof))
    assert set(claims) == {"aud", "exp", "iat", "jti", "wth", "tth", "oth"}
    assert claims["iat"] == int(NOW)  # tells a restarted verifier how new it is
    assert claims["aud"] == URL and list(claims["oth"]) == ["x-partner-token"]
    # A receiver that does not understand the oth entry refuses the WPT.
    with pytest.raises(AuthError) as err:
        _verify(headers, proof, WptPolicy())
    assert err.value.reason is Reason.PROOF_INVALID


def test_draft_01_carriage_and_no_other_tokens() -> None:
    headers = _outgoing([("Authorization", "Bearer app")], WimseUpstream("workload-proof-token"))
    assert "Authorization" not in headers
    _, wpt = _verify(headers, headers["Workload-Proof-Token"], WptPolicy())
    claims = json.loads(_payload(headers["Workload-Proof-Token"]))
    assert "oth" not in claims and "tth" not in claims and "ath" not in claims
    assert wpt.aud == URL


def test_each_request_gets_a_fresh_proof() -> None:
    a = _outgoing([], WimseUpstream())["Authorization"]
    b = _outgoing([], WimseUpstream())["Authorization"]
    assert a != b and json.loads(_payload(a))["jti"] != json.loads(_payload(b))["jti"]


def _payload(value: str) -> bytes:
    from sidecar.jose.b64 import b64url_decode

    return b64url_decode(value.split(" ")[-1].split(".")[1])


def test_sidecar_run_refuses_wimse_upstreams_with_an_attestor_without_wits() -> None:
    """Checked before anything starts (on a regression the sidecar would start and the
    wait below would time out instead)."""
    import asyncio

    from sidecar.run_command import serve

    data = {
        "identity": {"attestor": {"type": "spiffe", "socket": "unix:///nonexistent/agent.sock"}},
        "egress": upstream(listen="127.0.0.1:0"),
        "admin": {"listen": "127.0.0.1:0"},
    }
    with pytest.raises(ConfigError) as err:
        asyncio.run(asyncio.wait_for(serve(data), 5))
    assert err.value.key == "egress.upstreams[0].auth"
