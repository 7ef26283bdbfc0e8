"""Token endpoint wire format (sidecar.broker.oauth) and the revocation list
(sidecar.broker.revocation): RFC 6749 §3.2/§5.2, RFC 8693 §2.1/§2.2, RFC 9110 §13.1.2."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import urlencode

import pytest
from aiohttp.test_utils import make_mocked_request

from sidecar.broker.codes import OAuthCode
from sidecar.broker.http_app import token_request
from sidecar.broker.oauth import (
    JWT_TOKEN_TYPE,
    TOKEN_EXCHANGE_GRANT,
    WIT_TOKEN_TYPE,
    OAuthError,
    TokenHttpRequest,
    parse_exchange,
    parse_form,
    parse_request,
    targets,
    token_response,
    wit_response,
)
from sidecar.broker.revocation import RevocationStore, etag_matches
from sidecar.errors import ConfigError

FORM = "application/x-www-form-urlencoded"
NOW = 1_700_000_000.0


def form(*pairs: tuple[str, str], content_type: str = FORM) -> object:
    return parse_form(content_type, urlencode(list(pairs)).encode())


def base(*extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [
        ("grant_type", TOKEN_EXCHANGE_GRANT),
        ("subject_token", "a.b.c"),
        ("subject_token_type", JWT_TOKEN_TYPE),
        *extra,
    ]


def error_of(pairs: list[tuple[str, str]], content_type: str = FORM) -> str:
    with pytest.raises(OAuthError) as err:
        parse_exchange(parse_form(content_type, urlencode(pairs).encode()))
    return err.value.error


def test_a_valid_exchange_request() -> None:
    req = parse_exchange(
        parse_form(
            "application/x-www-form-urlencoded; charset=UTF-8",
            urlencode(base(("audience", "a"), ("audience", "b"), ("audience", "a"))).encode(),
        )
    )
    assert req.subject_token == "a.b.c"
    assert req.audiences == ["a", "b"]


def test_an_exchange_for_a_wit_has_no_audience() -> None:
    wit = ("requested_token_type", WIT_TOKEN_TYPE)
    req = parse_exchange(parse_form(FORM, urlencode(base(wit)).encode()))
    assert req.wit and req.audiences == []
    # An audience with it would be silently dropped: refused instead.
    assert error_of(base(wit, ("audience", "a"))) == "invalid_request"
    assert error_of(base(wit, ("resource", "https://x"))) == "invalid_request"
    assert not parse_exchange(parse_form(FORM, urlencode(base(("audience", "a"))).encode())).wit


@pytest.mark.parametrize(
    ("pairs", "error"),
    [
        ([("grant_type", "client_credentials"), ("audience", "a")], "unsupported_grant_type"),
        ([("audience", "a")], "invalid_request"),  # no grant_type
        (base(("grant_type", TOKEN_EXCHANGE_GRANT), ("audience", "a")), "invalid_request"),
        (base(("subject_token", "x"), ("audience", "a")), "invalid_request"),
        (base(), "invalid_request"),  # no audience
        (base(("audience", "")), "invalid_request"),  # empty = omitted (RFC 6749 §3.2)
        (base(("audience", "a"), ("resource", "https://r")), "invalid_target"),
        (base(("audience", "a"), ("actor_token", "x")), "invalid_request"),
        (base(("audience", "a"), ("scope", "read")), "invalid_scope"),
        (base(("audience", "a"), ("requested_token_type", "urn:x")), "invalid_request"),
        ([(k, v) for k, v in base(("audience", "a")) if k != "subject_token"], "invalid_request"),
        (
            [
                (k, "urn:ietf:params:oauth:token-type:id_token" if k == "subject_token_type" else v)
                for k, v in base(("audience", "a"))
            ],
            "invalid_request",
        ),
        (base(*[("audience", f"a{i}") for i in range(17)]), "invalid_request"),
    ],
)
def test_exchange_request_errors(pairs: list[tuple[str, str]], error: str) -> None:
    assert error_of(pairs) == error


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"grant_type=x"),
        (None, b"grant_type=x"),
        (FORM, b"a=1&b"),  # a field without '='
        (FORM, "audience=\u00e9".encode()),  # not ASCII: a form is percent-encoded
        (FORM, b"&".join(b"a=%d" % i for i in range(100))),
        (FORM, b"a=" + b"x" * 70_000),
    ],
)
def test_bad_forms_are_invalid_request(content_type: str | None, body: bytes) -> None:
    with pytest.raises(OAuthError) as err:
        parse_form(content_type, body)
    assert err.value.error == "invalid_request" and err.value.status == 400


def test_error_body_is_rfc6749_json_with_safe_characters() -> None:
    exc = OAuthError(OAuthCode.INVALID_REQUEST, 'bad "thing"\\ with\nnewline \u00e9')
    doc = json.loads(exc.body())
    assert set(doc) == {"error", "error_description"}
    assert all(" " <= c <= "~" and c not in '"\\' for c in doc["error_description"])


@pytest.mark.parametrize("name", ["client_secret", "client_assertion", "client_assertion_type"])
def test_client_credentials_in_the_body_are_400_invalid_client(name: str) -> None:
    """RFC 9110 §15.5.2: a 401 must carry a challenge, and there is no scheme to offer for
    credentials sent in the form: so 400 (RFC 6749 §5.2 allows it), never a bare 401."""
    with pytest.raises(OAuthError) as err:
        form(*base(("audience", "a"), (name, "s3cr3t")))
    assert (err.value.error, err.value.status, err.value.headers) == ("invalid_client", 400, ())


def test_client_authentication_in_the_header_is_401_with_its_challenge() -> None:
    request = TokenHttpRequest(
        content_type=FORM,
        body=urlencode(base(("audience", "a"))).encode(),
        authorization="Basic Y2xpZW50OnNlY3JldA==",
        dpop=(),
        htu="https://broker/token",
    )
    with pytest.raises(OAuthError) as err:
        parse_request(request)
    assert (err.value.error, err.value.status) == ("invalid_client", 401)
    assert err.value.headers == (("WWW-Authenticate", 'Basic realm="sidecar-broker"'),)


def test_token_response_shape() -> None:
    assert json.loads(token_response("t.o.k", 300)) == {
        "access_token": "t.o.k",
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "DPoP",
        "expires_in": 300,
    }


def test_wit_response_shape() -> None:
    assert json.loads(wit_response("w.i.t", 60)) == {
        "access_token": "w.i.t",
        "issued_token_type": "urn:ietf:params:oauth:token-type:wit",
        "token_type": "N_A",
        "expires_in": 60,
    }


def test_unix_targets_dedupe_and_limits() -> None:
    assert targets(parse_form(FORM, b"audience=x&audience=y&audience=x&grant_type=ignored")) == [
        "x",
        "y",
    ]


# -- revocation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "etag", "match"),
    [
        (None, '"a"', False),
        ('"a"', '"a"', True),
        ('W/"a"', '"a"', True),  # If-None-Match uses the weak comparison
        ('"b", "a"', '"a"', True),
        ('"b"', '"a"', False),
        ("*", '"a"', True),
    ],
)
def test_if_none_match(header: str | None, etag: str, match: bool) -> None:
    assert etag_matches(header, etag) is match


def test_revocation_document_etag_and_pruning() -> None:
    store = RevocationStore(None, jti_retention=100)
    empty = store.published()
    assert json.loads(empty.body) == {"subjects": [], "jtis": []}
    assert store.revoke_subject("spiffe://t/b") and store.revoke_subject("spiffe://t/a")
    assert not store.revoke_subject("spiffe://t/a")
    assert store.revoke_jti("j1", NOW)
    doc = store.published()
    assert json.loads(doc.body) == {"subjects": ["spiffe://t/a", "spiffe://t/b"], "jtis": ["j1"]}
    assert doc.etag != empty.etag and doc.etag.startswith('"') and not doc.etag.startswith("W/")
    assert store.published() is doc
    assert store.prune(NOW + 99) == []
    assert store.prune(NOW + 100) == ["j1"]
    assert store.restore_subject("spiffe://t/b") and not store.restore_subject("spiffe://t/b")
    assert json.loads(store.published().body) == {"subjects": ["spiffe://t/a"], "jtis": []}


def test_revocation_state_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "revocations.json"
    store = RevocationStore(str(path), jti_retention=100)
    store.load()  # no file yet: empty
    store.revoke_subject("spiffe://t/a")
    store.revoke_jti("j1", NOW)
    store.save_sync(store.state_bytes())
    again = RevocationStore(str(path), jti_retention=100)
    again.load()
    assert again.subjects == {"spiffe://t/a"} and again.jtis == {"j1": NOW}
    assert again.published().etag == store.published().etag
    assert [p.name for p in tmp_path.iterdir()] == ["revocations.json"], "no temporary left"


@pytest.mark.parametrize("content", ["{not json", '{"subjects": "x", "jtis": {}}', "[]"])
def test_a_corrupt_state_file_stops_the_start(tmp_path: Path, content: str) -> None:
    path = tmp_path / "revocations.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        RevocationStore(str(path), jti_retention=1).load()
    assert err.value.key == "revocation.state_file"


@pytest.mark.parametrize(
    ("host", "htu"),
    [
        ("broker.local:8443", "http://broker.local:8443/token"),
        ("[::1]:8443", "http://[::1]:8443/token"),
        ("broker.local?", None),  # the path would become a query: a proof for / would match
        ("broker.local#", None),
        ("broker.local/", None),
        ("x@broker.local", None),
    ],
)
def test_token_endpoint_url_is_built_only_from_a_plain_host(host: str, htu: str | None) -> None:
    request = make_mocked_request("POST", "/token?q=1", headers={"Host": host})
    assert asyncio.run(token_request(request, "http")).htu == htu
