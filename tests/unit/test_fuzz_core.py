"""Property tests: ``Authorizer.evaluate`` either decides or it has a bug.

Whatever arrives in the headers (random text, base64url-looking garbage, real tokens and proofs
cut, flipped, swapped and blown up to 100 KB, correctly signed tokens and proofs whose claims
have the wrong types), ``evaluate`` returns a ``Deny`` (401/403/503) or a ``PendingAllow`` and
never raises: input either verifies or is refused with one of our reasons; anything else is a
bug (docs/ARCHITECTURE.md, "Reason codes").
"""

from __future__ import annotations

import json
import string
from typing import Any

from factory import (
    AUDIENCE,
    ES_ISSUER,
    FRONTEND,
    HOST,
    NOW,
    encode_segment,
    make_harness,
    url_for,
    view,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.authz.core import PendingAllow
from sidecar.authz.decision import Deny, RequestView
from sidecar.errors import Reason
from sidecar.jose.b64 import b64url_decode, b64url_encode
from sidecar.jose.rfc7515_jws import sign_compact
from sidecar.jose.rfc9449_dpop import access_token_hash

FUZZ = settings(max_examples=300, deadline=None)

H = make_harness()
TOKEN = H.token()
PROOF = H.proof(TOKEN)
B64 = string.ascii_letters + string.digits + "-_"


def check(request: RequestView) -> Deny | PendingAllow:
    result = H.authz.evaluate(request, NOW)
    assert isinstance(result, Deny | PendingAllow), result
    if isinstance(result, Deny):
        assert result.status in {401, 403, 503}
        assert result.reason in set(Reason) - {Reason.INTERNAL_ERROR}
        assert ("x-authz-reason", result.reason.value) in result.headers
    return result


def decoded(token: str) -> tuple[bytes, ...] | None:
    try:
        return tuple(b64url_decode(part) for part in token.split("."))
    except ValueError:
        return None


# -- strategies -----------------------------------------------------------------------------

b64_segments = st.lists(st.text(alphabet=B64, max_size=200), min_size=1, max_size=5).map(".".join)
scheme_words = st.sampled_from(["DPoP", "Bearer", "dpop", "bearer", "Basic", "", "DPoP  "])
json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
huge = st.integers(min_value=0, max_value=100_000)


@st.composite
def credential_values(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["text", "b64", "scheme+b64", "scheme+text", "json-segments"]))
    if kind == "text":
        return draw(st.text(max_size=300))
    if kind == "b64":
        return draw(b64_segments)
    if kind == "scheme+b64":
        return f"{draw(scheme_words)} {draw(b64_segments)}"
    if kind == "scheme+text":
        return f"{draw(scheme_words)} {draw(st.text(max_size=300))}"
    header = draw(
        st.dictionaries(
            st.sampled_from(["alg", "typ", "kid", "jwk", "crit"]), json_values, max_size=4
        )
    )
    payload = draw(json_values)
    return f"{draw(scheme_words)} {encode_segment(header)}.{encode_segment(payload)}.AAAA"


header_names = st.sampled_from(
    ["authorization", "dpop", "x-workload-id", "x-workload-foo", "host", "content-type"]
) | st.text(alphabet=string.ascii_lowercase + "-", min_size=1, max_size=20)
paths = st.sampled_from(
    [
        "/orders",
        "/pay",
        "/public/x",
        "/ordersX",
        "/public/../admin",
        "/%2e%2e/x",
        "",
        "*",
        "/a%2fb",
        "/orders?x=1",
        "/%ff",
    ]
) | st.text(max_size=60)
methods = st.sampled_from(["GET", "POST", "DELETE", "get", ""]) | st.text(max_size=10)


@FUZZ
@given(
    headers=st.dictionaries(header_names, credential_values() | st.text(max_size=100), max_size=5),
    method=methods,
    path=paths,
    authority=st.sampled_from([HOST, HOST + ":443", "[::1]:80", "", "a b", "[::1"])
    | st.text(max_size=30),
    scheme=st.sampled_from(["https", "http", "", "ftp"]),
)
def test_random_headers(
    headers: dict[str, str], method: str, path: str, authority: str, scheme: str
) -> None:
    check(RequestView(method, scheme, authority, path, headers))


# -- real tokens and proofs, mutated --------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, original: str) -> str:
    kind = draw(
        st.sampled_from(
            [
                "truncate",
                "flip",
                "flip-b64",
                "swap",
                "drop",
                "duplicate",
                "huge",
                "insert",
                "replace-segment",
                "whitespace",
            ]
        )
    )
    parts = original.split(".")
    if kind == "truncate":
        return original[: draw(st.integers(0, len(original)))]
    if kind in ("flip", "flip-b64"):
        at = draw(st.integers(0, len(original) - 1))
        alphabet = st.sampled_from(B64) if kind == "flip-b64" else st.characters()
        char = draw(alphabet)
        return original[:at] + char + original[at + 1 :]
    if kind == "swap":
        return ".".join(draw(st.permutations(parts)))
    if kind == "drop":
        del parts[draw(st.integers(0, len(parts) - 1))]
        return ".".join(parts)
    if kind == "duplicate":
        i = draw(st.integers(0, len(parts) - 1))
        return ".".join([*parts[: i + 1], parts[i], *parts[i + 1 :]])
    if kind == "huge":
        i = draw(st.integers(0, len(parts) - 1))
        parts[i] += "A" * draw(huge)
        return ".".join(parts)
    if kind == "insert":
        at = draw(st.integers(0, len(original)))
        return (
            original[:at] + draw(st.sampled_from([".", ",", " ", "=", "\x00", "%"])) + original[at:]
        )
    if kind == "replace-segment":
        i = draw(st.integers(0, len(parts) - 1))
        parts[i] = b64url_encode(json.dumps(draw(json_values)).encode())
        return ".".join(parts)
    return (
        draw(st.sampled_from([" ", "\t", "\n"])) + original + draw(st.sampled_from(["", " ", "\t"]))
    )


@FUZZ
@given(token=mutated(TOKEN), scheme=st.sampled_from(["DPoP", "Bearer"]), path=paths)
def test_mutated_access_token(token: str, scheme: str, path: str) -> None:
    proof = H.proof(token.strip())
    result = check(view(path=path, headers={"authorization": f"{scheme} {token}", "dpop": proof}))
    if isinstance(result, PendingAllow):
        # Only a spelling of the same token can pass (e.g. other unused low bits in the last
        # base64url character of the signature): same header, claims and signature bytes.
        assert decoded(token.strip()) == decoded(TOKEN)


# Mutations of the proof stay ASCII here; non-ASCII proofs are a known bug, tested below.
@FUZZ
@given(proof=mutated(PROOF).filter(str.isascii), path=paths)
def test_mutated_proof(proof: str, path: str) -> None:
    result = check(view(path=path, headers={"authorization": f"DPoP {TOKEN}", "dpop": proof}))
    if isinstance(result, PendingAllow):
        assert decoded(proof.strip()) == decoded(PROOF)


# -- correctly signed, wrongly typed ---------------------------------------------------------

claim_values = (
    st.sampled_from(["1", True, False, [1], {"a": 1}, None, 1e300, -1, 2**70, "", "x" * 5000])
    | json_values
)


@st.composite
def signed_tokens(draw: st.DrawFn) -> str:
    claims: dict[str, Any] = H.issuer.claims(jkt=H.client.thumbprint)
    for name in draw(st.sets(st.sampled_from([*sorted(claims), "cnf"]), max_size=4)):
        claims[name] = draw(claim_values)
    if draw(st.booleans()):
        claims["cnf"] = {
            "jkt": draw(
                st.sampled_from(["", "A" * 43, H.client.thumbprint])
                | st.text(alphabet=string.printable, max_size=60)
            )
        }
    header: dict[str, Any] = {"typ": "at+jwt", "kid": H.issuer.kid}
    for name in draw(st.sets(st.sampled_from(["typ", "kid", "jwk", "x5u", "zip"]), max_size=2)):
        header[name] = draw(claim_values)
    return sign_compact(H.issuer.private_key, "ES256", claims, header=header)


@FUZZ
@given(token=signed_tokens(), path=st.sampled_from(["/orders", "/pay", "/public/x"]))
def test_signed_tokens_with_wrong_claim_types(token: str, path: str) -> None:
    check(H.dpop_request(token=token, path=path))
    check(H.bearer_request(token=token, path=path))


ascii_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(alphabet=string.printable, max_size=60),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=6,
)


@st.composite
def signed_proofs(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> str:
    claims: dict[str, Any] = {
        "jti": "fuzz-jti",
        "htm": "GET",
        "htu": url_for("/orders"),
        "iat": int(NOW),
        "ath": access_token_hash(TOKEN),
    }
    for name in draw(
        st.sets(
            st.sampled_from(["jti", "htm", "htu", "iat", "ath", "nonce"]), min_size=1, max_size=3
        )
    ):
        claims[name] = draw(values)
    return H.manual_proof(TOKEN, claims=claims)


# Proof claim strings stay ASCII here; non-ASCII ath is a known bug, tested below.
@FUZZ
@given(
    proof=signed_proofs(
        ascii_json | st.sampled_from(["GET", url_for("/orders"), "https://x/" + "a" * 5000])
    )
)
def test_signed_proofs_with_wrong_claim_types(proof: str) -> None:
    check(view(headers={"authorization": f"DPoP {TOKEN}", "dpop": proof}))


# -- known bugs: each found by the properties above once the ASCII restriction is lifted ----


def _non_ascii_payload_proof() -> str:
    head, payload, sig = PROOF.split(".")
    return f"{head}.{payload[:10]}\u00e9{payload[11:]}.{sig}"


@FUZZ
@example(proof=_non_ascii_payload_proof())
@given(proof=mutated(PROOF))
def test_mutated_proof_including_non_ascii(proof: str) -> None:
    check(view(headers={"authorization": f"DPoP {TOKEN}", "dpop": proof}))


@FUZZ
@example(proof=H.manual_proof(TOKEN, claims={"ath": "\u00e9"}))
@given(proof=signed_proofs(json_values))
def test_signed_proofs_with_non_ascii_claims(proof: str) -> None:
    check(view(headers={"authorization": f"DPoP {TOKEN}", "dpop": proof}))


def test_non_ascii_cnf_jkt_is_denied_not_raised() -> None:
    token = H.issuer.token(jkt="\u00e9" * 43)
    check(H.dpop_request(token=token))


def test_harness_token_is_allowed() -> None:
    """The seeds the mutations start from really are accepted, so the properties above
    explore the neighbourhood of a valid request, not of garbage."""
    result = check(H.dpop_request(token=TOKEN))
    assert isinstance(result, PendingAllow)
    assert result.allow.identity.subject == FRONTEND
    assert result.allow.identity.issuer == ES_ISSUER
    cached = H.authz.token_cache.get(TOKEN, H.keys.generation)
    assert cached is not None and AUDIENCE in cached.audiences
