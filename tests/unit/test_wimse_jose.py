"""WIMSE WIT and WPT (draft-ietf-wimse-workload-creds-02, draft-ietf-wimse-wpt-01) and the
SPIFFE WIT-SVID profile: the drafts' example request verified with the clock frozen, its WPT
reproduced from the workload key, and every refusal."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from factory import ec_key, ed_key, encode_segment
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from sidecar.authz.replay import InMemoryReplayStore
from sidecar.errors import AuthError, Reason
from sidecar.jose.b64 import b64url_decode, b64url_encode
from sidecar.jose.rfc7515_jws import sign_compact
from sidecar.jose.rfc7517_jwk import PublicJWK, import_public_jwk, public_jwk_dict
from sidecar.jose.rfc7518_algorithms import sign
from sidecar.jose.wimse_wit import (
    VerifiedWIT,
    WitPolicy,
    issue_wit,
    verify_wit,
    workload_public_jwk,
    workload_trust_domain,
)
from sidecar.jose.wimse_wpt import WptPolicy, WptSigner, verify_wpt

VECTORS = Path(__file__).parent / "vectors" / "wimse"
DATA = json.loads((VECTORS / "wimse-keys.json").read_text())
NOW = float(DATA["clock"]["suggested_now"])
EXPECTED = DATA["wpt_01_expected"]
URL = EXPECTED["aud"]
ACCESS_TOKEN = EXPECTED["access_token"]
#: The example's WPT expires 516 s after the suggested clock: allow that much here.
EXAMPLE_POLICY = WptPolicy(max_lifetime=600)


def _request_headers() -> dict[str, str]:
    text = (VECTORS / "wimse-wpt-01-request.http").read_text()
    head = text.split("\n\n", 1)[0].splitlines()[1:]
    return {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head)}


HEADERS = _request_headers()
WIT = HEADERS["workload-identity-token"]
WPT = HEADERS["workload-proof-token"]
ISSUER_KEY = ECAlgorithm.from_jwk(json.dumps(DATA["wit_issuer_key"]))
WORKLOAD_KEY = OKPAlgorithm.from_jwk(json.dumps(DATA["workload_key"]))


class Bundle:
    """WIT keys by trust domain, as a SPIFFE bundle with ``use: wit-svid`` provides them."""

    def __init__(self, domains: dict[str, list[PublicJWK]]) -> None:
        self.domains = domains

    def wit_keys(self, trust_domain: str, kid: str | None) -> Sequence[PublicJWK]:
        keys = self.domains.get(trust_domain, [])
        return [k for k in keys if kid is None or k.kid == kid]


def _public(key: Any, kid: str) -> PublicJWK:
    return import_public_jwk(public_jwk_dict(key, kid=kid))


EXAMPLE_BUNDLE = Bundle({"example.com": [_public(ISSUER_KEY, "June 5")]})


def example_wit(now: float = NOW, policy: WitPolicy | None = None) -> VerifiedWIT:
    return verify_wit(WIT, keys=EXAMPLE_BUNDLE, now=now, policy=policy or WitPolicy())


def check_wpt(wpt: str, wit: VerifiedWIT | None = None, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "wit": wit or example_wit(),
        "now": NOW,
        "policy": EXAMPLE_POLICY,
        "url": URL,
        "access_token": ACCESS_TOKEN,
    }
    args.update(kw)
    return verify_wpt(wpt, **args)


def resigned_wpt(
    header: dict[str, Any] | None = None, claims: dict[str, Any] | None = None, key: Any = None
) -> str:
    """The example WPT with header or claims changed, signed again (by the workload key)."""
    p64 = WPT.split(".")[1]
    hdr = {"alg": "EdDSA", "typ": "wpt+jwt", **(header or {})}
    body = json.loads(b64url_decode(p64))
    body.update(claims or {})
    body = {k: v for k, v in body.items() if v is not None}
    signing_input = f"{encode_segment(hdr)}.{encode_segment(body)}"
    alg = "EdDSA" if key is None else hdr["alg"]
    sig = sign(alg, key or WORKLOAD_KEY, signing_input.encode())
    return f"{signing_input}.{b64url_encode(sig)}"


# -- the drafts' example ------------------------------------------------------------------


def test_example_request_verifies_with_the_clock_frozen() -> None:
    wit = example_wit()
    assert wit.subject == "wimse://example.com/specific-workload"
    assert wit.trust_domain == "example.com"
    assert wit.kid == "June 5"
    assert wit.key_alg == "EdDSA"
    assert wit.wth == EXPECTED["wth"]
    proof = check_wpt(WPT, wit)
    assert proof.jti == EXPECTED["jti"]
    assert proof.aud == URL
    assert proof.exp == DATA["clock"]["wpt_exp"]


def test_example_wpt_is_reproduced_from_the_workload_key() -> None:
    signer = WptSigner(WORKLOAD_KEY, "EdDSA")
    again = signer.proof(
        url=URL + "?ignored=query",
        wit=WIT,
        now=NOW,
        access_token=ACCESS_TOKEN,
        jti=EXPECTED["jti"],
        exp=DATA["clock"]["wpt_exp"],
        with_iat=False,
    )
    assert again == WPT  # Ed25519 is deterministic: same claims, same key, same bytes


@pytest.mark.parametrize(
    "typ", ["wpt+jwt", "application/wpt+jwt", "WPT+JWT", "Application/Wpt+Jwt"]
)
def test_wpt_typ_spellings_accepted(typ: str) -> None:
    assert check_wpt(resigned_wpt({"typ": typ})).jti == EXPECTED["jti"]


# -- WPT refusals -------------------------------------------------------------------------


def _denied(reason: Reason, fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(AuthError) as err:
        fn(*args, **kw)
    assert err.value.reason is reason, err.value.detail
    return err.value.detail


def test_wpt_wrong_typ_denied() -> None:
    for typ in ("jwt", "dpop+jwt", "wit+jwt", None):
        _denied(Reason.PROOF_INVALID, check_wpt, resigned_wpt({"typ": typ}))


def test_wpt_alg_other_than_cnf_alg_denied() -> None:
    es = ec_key(71)
    wpt = resigned_wpt({"alg": "ES256"}, key=es)
    assert "cnf.jwk alg" in _denied(Reason.PROOF_KEY_MISMATCH, check_wpt, wpt)
    # The RFC 9864 name of the same algorithm is still another alg value than the WIT's.
    _denied(Reason.PROOF_KEY_MISMATCH, check_wpt, resigned_wpt({"alg": "Ed25519"}))


def test_wpt_signed_by_another_key_denied() -> None:
    other = ed_key(72)
    wpt = resigned_wpt(key=other, header={"alg": "EdDSA"})
    assert "signature" in _denied(Reason.PROOF_INVALID, check_wpt, wpt)


def test_tampered_wit_fails_wth() -> None:
    # Another valid WIT for the same workload key (a different jti): the example WPT was made
    # for the original one, so its wth no longer matches.
    cnf = DATA["workload_key"].copy()
    cnf.pop("d")
    other_wit = issue_wit(
        ISSUER_KEY,
        alg="ES256",
        kid="June 5",
        subject="wimse://example.com/specific-workload",
        workload_jwk=cnf,
        now=NOW - 60,
        lifetime=3600,
    )
    wit = verify_wit(other_wit, keys=EXAMPLE_BUNDLE, now=NOW, policy=WitPolicy())
    assert "wth" in _denied(Reason.PROOF_KEY_MISMATCH, check_wpt, WPT, wit)


def test_tampered_wit_bytes_fail_its_signature() -> None:
    h64, p64, s64 = WIT.split(".")
    claims = json.loads(b64url_decode(p64))
    claims["sub"] = "wimse://example.com/another-workload"
    forged = f"{h64}.{encode_segment(claims)}.{s64}"
    _denied(
        Reason.BAD_SIGNATURE, verify_wit, forged, keys=EXAMPLE_BUNDLE, now=NOW, policy=WitPolicy()
    )


def test_wpt_expired_denied() -> None:
    exp = DATA["clock"]["wpt_exp"]
    assert check_wpt(WPT, now=exp + 4.9).jti  # within the leeway
    assert "expired" in _denied(Reason.IAT_OUT_OF_WINDOW, check_wpt, WPT, now=exp + 5)


def test_wpt_exp_too_far_ahead_denied() -> None:
    # Under the default policy (5 minutes) the example's 8.6-minute WPT is too long-lived.
    detail = _denied(Reason.IAT_OUT_OF_WINDOW, check_wpt, WPT, policy=WptPolicy())
    assert "too far ahead" in detail


def test_wit_expired_denied() -> None:
    wit_exp = DATA["clock"]["wit_exp"]
    _denied(Reason.EXPIRED, example_wit, wit_exp + 5)


def test_wpt_wrong_aud_denied() -> None:
    _denied(Reason.HTU_MISMATCH, check_wpt, WPT, url="https://workload.example.com/other")
    _denied(Reason.HTU_MISMATCH, check_wpt, WPT, url="https://elsewhere.example.com/path")


def test_wpt_aud_checked_by_the_callers_rule() -> None:
    seen: list[str] = []

    def check(aud: str) -> None:
        seen.append(aud)
        raise AuthError(Reason.UNKNOWN_AUTHORITY, "not ours")

    _denied(Reason.UNKNOWN_AUTHORITY, check_wpt, WPT, check_aud=check)
    assert seen == [URL]


def test_replayed_jti_denied_by_the_replay_store() -> None:
    store = InMemoryReplayStore()
    policy = EXAMPLE_POLICY
    first = check_wpt(WPT)
    assert store.check_and_insert_sync(first.replay_key, NOW, policy.replay_ttl)
    second = check_wpt(WPT)
    assert second.replay_key == first.replay_key
    assert not store.check_and_insert_sync(second.replay_key, NOW + 1, policy.replay_ttl)
    # Per sender: another workload key may use the same jti.
    assert first.replay_key.startswith(f"wpt:{example_wit().key.thumbprint}:")


def test_wpt_unknown_oth_entry_denied() -> None:
    oth = {"x-custom-token": b64url_encode(b"\0" * 32)}
    wpt = resigned_wpt(claims={"oth": oth})
    detail = _denied(Reason.PROOF_INVALID, check_wpt, wpt, headers={"x-custom-token": "t"})
    assert "oth" in detail


def test_wpt_understood_oth_entry_checked() -> None:
    signer = WptSigner(WORKLOAD_KEY, "EdDSA")
    wpt = signer.proof(
        url=URL, wit=WIT, now=NOW, access_token=ACCESS_TOKEN, other_tokens={"X-Txn": " abc "}
    )
    policy = WptPolicy(other_tokens=frozenset({"x-txn"}))
    assert check_wpt(wpt, policy=policy, headers={"x-txn": "abc"}).jti
    _denied(Reason.ATH_MISMATCH, check_wpt, wpt, policy=policy, headers={"x-txn": "abd"})
    _denied(Reason.ATH_MISMATCH, check_wpt, wpt, policy=policy, headers={})


def test_wpt_ath_binds_the_access_token() -> None:
    _denied(Reason.ATH_MISMATCH, check_wpt, WPT, access_token="another-token")
    # ath present but no access token sent: the WPT was made for another request.
    _denied(Reason.ATH_MISMATCH, check_wpt, WPT, access_token=None)
    no_ath = resigned_wpt(claims={"ath": None})
    _denied(Reason.ATH_MISMATCH, check_wpt, no_ath)
    assert check_wpt(no_ath, access_token=None).jti


@pytest.mark.parametrize(
    "claims",
    [{"jti": None}, {"jti": ""}, {"jti": "a\nb"}, {"aud": None}, {"exp": None}, {"exp": True}],
)
def test_wpt_claims_required(claims: dict[str, Any]) -> None:
    _denied(Reason.PROOF_INVALID, check_wpt, resigned_wpt(claims=claims))


def test_wpt_with_crit_or_junk_denied() -> None:
    _denied(Reason.PROOF_INVALID, check_wpt, resigned_wpt({"crit": ["x"], "x": 1}))
    _denied(Reason.PROOF_INVALID, check_wpt, "a.b")
    _denied(Reason.PROOF_INVALID, check_wpt, WPT + "x" * 5000)


# -- WIT and the WIT-SVID profile ---------------------------------------------------------

TD = "demo.local"
SPIFFE_ID = "spiffe://demo.local/ns/shop/sa/frontend"
SVID_ISSUER = ec_key(73)
SVID_BUNDLE = Bundle({TD: [_public(SVID_ISSUER, "wit-1")]})
SVID = WitPolicy(svid=True)


def svid_claims(**over: Any) -> dict[str, Any]:
    workload = ec_key(74)
    claims: dict[str, Any] = {
        "sub": SPIFFE_ID,
        "exp": int(NOW + 3600),
        "iat": int(NOW),
        "cnf": {"jwk": workload_public_jwk(workload, "ES256")},
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def svid_token(header: dict[str, Any] | None = None, key: Any = SVID_ISSUER, **over: Any) -> str:
    hdr = {"kid": "wit-1", "typ": "wit+jwt", **(header or {})}
    hdr = {k: v for k, v in hdr.items() if v is not None}
    alg = hdr.pop("alg", "ES256")
    return sign_compact(key, alg, svid_claims(**over), header=hdr)


def test_issued_wit_svid_verifies_under_the_strict_profile() -> None:
    workload = ec_key(75)
    token = issue_wit(
        SVID_ISSUER,
        alg="ES256",
        kid="wit-1",
        subject=SPIFFE_ID,
        workload_jwk=workload_public_jwk(workload, "ES256"),
        now=NOW,
        lifetime=4 * 3600,
    )
    wit = verify_wit(token, keys=SVID_BUNDLE, now=NOW, policy=SVID)
    assert (wit.subject, wit.trust_domain, wit.kid, wit.key_alg) == (
        SPIFFE_ID,
        TD,
        "wit-1",
        "ES256",
    )
    assert wit.expires_at == NOW + 4 * 3600
    # A WPT by the workload key verifies against it, end to end.
    url = "https://orders.demo.local/pay"
    wpt = WptSigner(workload, "ES256").proof(url=url, wit=token, now=NOW)
    assert verify_wpt(wpt, wit=wit, now=NOW, policy=WptPolicy(), url=url).jti


def test_wit_svid_missing_kid_denied() -> None:
    token = svid_token({"kid": None})
    _denied(Reason.MALFORMED_TOKEN, verify_wit, token, keys=SVID_BUNDLE, now=NOW, policy=SVID)
    # The general WIT profile takes a kid-less WIT when the trust domain's key is unambiguous.
    assert verify_wit(token, keys=SVID_BUNDLE, now=NOW, policy=WitPolicy()).kid is None


def test_wit_svid_eddsa_denied() -> None:
    ed = ed_key(76)
    bundle = Bundle({TD: [_public(ed, "wit-1")]})
    token = svid_token({"alg": "EdDSA"}, key=ed)
    _denied(Reason.ALG_NOT_ALLOWED, verify_wit, token, keys=bundle, now=NOW, policy=SVID)
    assert verify_wit(token, keys=bundle, now=NOW, policy=WitPolicy()).subject == SPIFFE_ID
    # ... and an EdDSA confirmation key (the drafts' example WIT) is refused by the profile too.
    _denied(Reason.ALG_NOT_ALLOWED, example_wit, NOW, SVID)


def test_wit_svid_aud_present_denied() -> None:
    token = svid_token(aud="spiffe://demo.local/ns/shop/sa/orders")
    _denied(Reason.WRONG_AUDIENCE, verify_wit, token, keys=SVID_BUNDLE, now=NOW, policy=SVID)


def test_wit_svid_extra_header_denied() -> None:
    token = svid_token({"x5t": "abc"})
    _denied(Reason.MALFORMED_TOKEN, verify_wit, token, keys=SVID_BUNDLE, now=NOW, policy=SVID)


@pytest.mark.parametrize("typ", ["jwt", "wpt+jwt", None])
def test_wit_wrong_typ_denied(typ: str | None) -> None:
    token = svid_token({"typ": typ})
    _denied(Reason.WRONG_TYPE, verify_wit, token, keys=SVID_BUNDLE, now=NOW, policy=WitPolicy())


@pytest.mark.parametrize(
    "over",
    [
        {"exp": None},
        {"sub": None},
        {"sub": "https://demo.local/x"},
        {"sub": "spiffe://demo.local:443/x"},
        {"sub": "spiffe://u@demo.local/x"},
        {"sub": "spiffe://demo.local/x?q"},
        {"cnf": None},
        {"cnf": {"jwk": {"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}}},
    ],
)
def test_wit_claims_required(over: dict[str, Any]) -> None:
    token = svid_token(**over)
    _denied(
        Reason.MALFORMED_TOKEN, verify_wit, token, keys=SVID_BUNDLE, now=NOW, policy=WitPolicy()
    )


def test_wit_cnf_key_without_alg_denied() -> None:
    jwk = public_jwk_dict(ec_key(77))
    token = svid_token(cnf={"jwk": jwk})
    detail = _denied(
        Reason.MALFORMED_TOKEN, verify_wit, token, keys=SVID_BUNDLE, now=NOW, policy=WitPolicy()
    )
    assert "alg" in detail


def test_wit_keys_are_those_of_the_sub_trust_domain() -> None:
    # Signed by demo.local's key but naming another trust domain: that domain has no key.
    token = svid_token(sub="spiffe://other.example/ns/x")
    _denied(Reason.UNKNOWN_KEY, verify_wit, token, keys=SVID_BUNDLE, now=NOW, policy=WitPolicy())
    # Another trust domain's key, under this trust domain's kid: the signature fails.
    stranger = ec_key(78)
    token = svid_token(key=stranger)
    _denied(Reason.BAD_SIGNATURE, verify_wit, token, keys=SVID_BUNDLE, now=NOW, policy=WitPolicy())


def test_wit_not_yet_valid_denied() -> None:
    token = svid_token(nbf=int(NOW + 60))
    _denied(Reason.NOT_YET_VALID, verify_wit, token, keys=SVID_BUNDLE, now=NOW, policy=WitPolicy())


def test_workload_trust_domain() -> None:
    assert workload_trust_domain("wimse://example.com/specific-workload") == "example.com"
    assert workload_trust_domain(SPIFFE_ID) == TD
    for bad in ("spiffe://", "spiffe://a b/c", "spiffe://td/x#f", "mailto:x@y"):
        with pytest.raises(ValueError):
            workload_trust_domain(bad)
