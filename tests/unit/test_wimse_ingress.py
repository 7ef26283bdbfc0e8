"""Ingress ``auth: wimse`` routes through the decision core: WIT then WPT, ``aud`` against
``authz.authorities`` (never Host), replay per sender, wpt-02 error shapes, -01 carriage when
configured, identity headers from the WIT's ``sub``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from factory import FRONTEND, INTRUDER, NOW, POLICY_CONFIG, Harness, ec_key, make_harness, view

from sidecar.authz.config import parse_authz_config
from sidecar.authz.decision import Allow, Deny
from sidecar.authz.replay import InMemoryReplayStore, ReplayStore
from sidecar.authz.wimse import WimseSettings
from sidecar.errors import ConfigError, Reason
from sidecar.jose.b64 import b64url_decode, b64url_encode
from sidecar.jose.rfc7517_jwk import public_jwk_dict
from sidecar.jose.rfc7518_algorithms import sign
from sidecar.jose.spiffe_bundle import import_bundle
from sidecar.jose.wimse_wit import WitPolicy, issue_wit, workload_public_jwk
from sidecar.jose.wimse_wpt import WptPolicy, WptSigner

TD = "demo.local"
ORIGIN = "https://orders.demo.local"
TD_KEY = ec_key(81)
WORKLOAD_KEY = ec_key(82)
BUNDLE = {
    "keys": [
        {**public_jwk_dict(TD_KEY, kid="wit-1"), "use": "wit-svid"},
        # The same key published for JWT-SVIDs only must not verify a WIT.
        {**public_jwk_dict(ec_key(84), kid="jwt-1"), "use": "jwt-svid"},
    ]
}
POLICY = {
    "routes": [*POLICY_CONFIG["routes"], {"prefix": "/wimse", "auth": "wimse"}],
    "rules": [
        *POLICY_CONFIG["rules"],
        {"name": "frontend-wimse", "principals": [FRONTEND], "paths": ["/wimse"]},
    ],
}


def harness(replay: ReplayStore | None = None, **wimse: Any) -> Harness:
    h = make_harness(
        policy_config=POLICY,
        authorities=frozenset({ORIGIN}),
        wimse=WimseSettings(**wimse),
        replay=replay,
    )
    h.authz.bundles.replace(TD, import_bundle(BUNDLE))  # what authz.trust_domains loads
    return h


def wit(subject: str = FRONTEND, key: Any = TD_KEY, lifetime: float = 3600) -> str:
    return issue_wit(
        key,
        alg="ES256",
        kid="wit-1",
        subject=subject,
        workload_jwk=workload_public_jwk(WORKLOAD_KEY, "ES256"),
        now=NOW - 10,
        lifetime=lifetime,
    )


SIGNER = WptSigner(WORKLOAD_KEY, "ES256")


def request(
    path: str = "/wimse/items",
    *,
    token: str | None = None,
    url: str | None = None,
    carriage: str = "authorization",
    extra: dict[str, str] | None = None,
    signed_at: float = NOW,
    with_iat: bool = True,
    **kw: Any,
) -> Any:
    token = token or wit()
    wpt = SIGNER.proof(url=url or ORIGIN + path, wit=token, now=signed_at, with_iat=with_iat)
    headers = {"workload-identity-token": token}
    if carriage == "authorization":
        headers["authorization"] = f"WPT {wpt}"
    else:
        headers["workload-proof-token"] = wpt
    headers.update(extra or {})
    return view(path=path, headers=headers, **kw)


def denied(decision: Any, status: int, reason: Reason) -> Deny:
    assert isinstance(decision, Deny), decision
    assert (decision.status, decision.reason) == (status, reason), decision.detail
    return decision


def challenge(deny: Deny) -> str | None:
    return dict(deny.headers).get("www-authenticate")


def test_wit_and_wpt_allow_with_the_spiffe_id_as_identity() -> None:
    h = harness()
    req = request(extra={"x-workload-id": "spiffe://demo.local/ns/x/sa/admin"})
    decision = h.decide(req)
    assert isinstance(decision, Allow), decision
    assert decision.identity.subject == FRONTEND
    assert decision.identity.auth == "wimse"
    assert decision.identity.jkt is not None
    headers = dict(decision.headers_to_set)
    assert headers["x-workload-id"] == FRONTEND
    assert headers["x-workload-auth"] == "wimse"
    removed = set(decision.headers_to_remove)
    assert {"authorization", "workload-identity-token", "workload-proof-token"} <= removed
    assert decision.metadata["proof_jti"]


def test_the_same_wpt_replayed_is_denied() -> None:
    h = harness()
    req = request()
    assert isinstance(h.decide(req), Allow)
    deny = denied(h.decide(req, NOW + 1), 401, Reason.REPLAYED)
    assert (challenge(deny) or "").startswith('WPT error="invalid_proof"')


def test_aud_is_checked_against_authorities_never_host() -> None:
    h = harness()
    # The client's Host names another origin: irrelevant, the aud is one of the authorities.
    assert isinstance(h.decide(request(authority="evil.example")), Allow)
    # A WPT whose aud follows the Host it was sent with, not a configured origin: refused.
    evil = request(url="https://evil.example/wimse/items", authority="evil.example")
    denied(h.decide(evil), 401, Reason.UNKNOWN_AUTHORITY)
    denied(h.decide(request(url=ORIGIN + "/wimse/other")), 401, Reason.HTU_MISMATCH)


def test_bad_wit_is_a_400_without_challenge() -> None:
    h = harness()
    deny = denied(h.decide(request(token=wit(key=ec_key(83)))), 400, Reason.BAD_SIGNATURE)
    assert challenge(deny) is None
    assert json.loads(deny.body)["error"] == "invalid_token"
    denied(h.decide(request(token=wit(lifetime=5))), 400, Reason.EXPIRED)
    # A WIT naming a trust domain we hold no keys for.
    denied(h.decide(request(token=wit("spiffe://other.example/x"))), 400, Reason.UNKNOWN_KEY)


def test_missing_credentials_get_a_wpt_challenge() -> None:
    h = harness()
    deny = denied(h.decide(view(path="/wimse/items")), 401, Reason.MISSING_CREDENTIALS)
    assert challenge(deny) == "WPT"
    no_proof = view(path="/wimse/items", headers={"workload-identity-token": wit()})
    deny = denied(h.decide(no_proof), 401, Reason.PROOF_MISSING)
    assert (challenge(deny) or "").startswith("WPT ")


def test_bearer_beside_the_wit_is_not_a_proof() -> None:
    req = view(
        path="/wimse/items",
        headers={"workload-identity-token": wit(), "authorization": "Bearer abc"},
    )
    denied(harness().decide(req), 401, Reason.PROOF_MISSING)


def test_draft01_header_only_when_configured() -> None:
    denied(harness().decide(request(carriage="header")), 401, Reason.PROOF_MISSING)
    h = harness(accept_proof_header=True)
    assert isinstance(h.decide(request(carriage="header")), Allow)
    # A bad -01 proof is a 400 (wpt-01 §4), no challenge.
    bad = request(carriage="header", url=ORIGIN + "/elsewhere")
    deny = denied(h.decide(bad), 400, Reason.HTU_MISMATCH)
    assert challenge(deny) is None


def test_two_proofs_refused() -> None:
    h = harness(accept_proof_header=True)
    req = request()
    headers = dict(req.headers)
    headers["workload-proof-token"] = headers["authorization"][4:]
    deny = denied(h.decide(view(path="/wimse/items", headers=headers)), 401, Reason.PROOF_INVALID)
    assert "both" in deny.detail
    merged = dict(req.headers)
    merged["authorization"] += ", WPT x.y.z"
    denied(h.decide(view(path="/wimse/items", headers=merged)), 401, Reason.PROOF_INVALID)


def test_policy_applies_to_the_wit_subject() -> None:
    deny = denied(harness().decide(request(token=wit(INTRUDER))), 403, Reason.POLICY_DENIED)
    assert challenge(deny) is None


def test_revoked_subject_denied() -> None:
    h = harness()
    h.revocations.replace(subjects=frozenset({FRONTEND}), jtis=frozenset(), version="1")
    denied(h.decide(request()), 401, Reason.REVOKED)


def test_dpop_routes_unaffected() -> None:
    h = harness()
    assert isinstance(h.decide(h.dpop_request()), Allow)
    # A WIT + WPT on a DPoP route is not a DPoP credential.
    denied(h.decide(request(path="/orders")), 401, Reason.MISSING_CREDENTIALS)


VECTORS = Path(__file__).parent / "vectors" / "wimse"


def test_the_drafts_example_request_passes_the_ingress() -> None:
    """The -01 example request (WIT profile, EdDSA, a Bearer token beside the WPT bound by
    ath) through the whole core, clock frozen."""
    data = json.loads((VECTORS / "wimse-keys.json").read_text())
    head = (VECTORS / "wimse-wpt-01-request.http").read_text().split("\n\n", 1)[0]
    lines = head.splitlines()[1:]
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
    policy = {
        "routes": [{"prefix": "/path", "auth": "wimse"}],
        "rules": [{"principals": ["wimse://example.com/*"], "paths": ["/path"]}],
    }
    h = make_harness(
        policy_config=policy,
        authorities=frozenset({"https://workload.example.com"}),
        wimse=WimseSettings(
            wit=WitPolicy(svid=False),
            wpt=WptPolicy(max_lifetime=600),
            accept_proof_header=True,
        ),
    )
    bundle = json.loads((VECTORS / "example.com.bundle.json").read_text())
    h.authz.bundles.replace("example.com", import_bundle(bundle))
    req = view(method="POST", path="/path", headers=headers, authority="workload.example.com")
    decision = h.decide(req, float(data["clock"]["suggested_now"]))
    assert isinstance(decision, Allow), decision
    assert decision.identity.subject == "wimse://example.com/specific-workload"
    # The access token beside it must be the one the WPT's ath covers.
    tampered = dict(headers, authorization="Bearer another")
    req = view(method="POST", path="/path", headers=tampered, authority="workload.example.com")
    denied(h.decide(req, float(data["clock"]["suggested_now"])), 400, Reason.ATH_MISMATCH)


# -- configuration ------------------------------------------------------------------------


def _config(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "audience": "a",
        "trust_domains": [{"name": TD, "bundle_file": "/etc/demo.local.bundle.json"}],
        "authorities": [ORIGIN],
        "routes": [{"prefix": "/wimse", "auth": "wimse"}],
        "wimse": {"profile": "wit", "max_proof_lifetime": 60, "accept_proof_header": True},
    }
    cfg.update(over)
    return cfg


def test_config_wimse_section() -> None:
    wimse = parse_authz_config(_config()).settings.wimse
    assert not wimse.wit.svid and wimse.accept_proof_header
    assert wimse.wpt.max_lifetime == 60
    default = parse_authz_config(_config(wimse={})).settings.wimse
    assert default.wit.svid and not default.accept_proof_header
    assert default.wpt.max_lifetime == 300


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        parse_authz_config(_config(authorities=[]))
    assert err.value.key == "authz.authorities"
    no_td = _config(trust_domains=[], issuers=[{"issuer": "https://i.example"}])
    with pytest.raises(ConfigError) as err:
        parse_authz_config(no_td)
    assert err.value.key == "authz.trust_domains"
    with pytest.raises(ConfigError) as err:
        parse_authz_config(_config(wimse={"profile": "svid"}))
    assert err.value.key == "authz.wimse.profile"


# -- restart guard: a WPT's iat tells a restarted verifier how new it is ---------------------


def test_after_a_restart_a_new_wpt_with_iat_passes_within_seconds() -> None:
    epoch = NOW  # the authorizer (and its in-memory replay store) started now
    h = harness(replay=InMemoryReplayStore(epoch=epoch))
    # Signed just before the restart: it may have been used then, so it is refused.
    early = h.decide(request(signed_at=epoch - 1), epoch + 1)
    assert denied(early, 503, Reason.PROOF_PREDATES_RESTART)
    # Signed 7 s after the start (past the 5 s leeway): new, accepted, and only once.
    fresh = request(signed_at=epoch + 7)
    assert isinstance(h.decide(fresh, epoch + 7), Allow)
    denied(h.decide(fresh, epoch + 7), 401, Reason.REPLAYED)


def test_after_a_restart_a_wpt_without_iat_waits_for_the_longest_lifetime() -> None:
    # Without iat a 30 s WPT may have been signed up to max_proof_lifetime before its exp.
    epoch = NOW
    h = harness(replay=InMemoryReplayStore(epoch=epoch))
    for at in (epoch + 7, epoch + 200):
        deny = h.decide(request(signed_at=at, with_iat=False), at)
        denied(deny, 503, Reason.PROOF_PREDATES_RESTART)
    late = epoch + 300
    assert isinstance(h.decide(request(signed_at=late, with_iat=False), late), Allow)


@pytest.mark.parametrize(
    ("iat", "status", "reason"),
    [
        (NOW + 6, 401, Reason.IAT_OUT_OF_WINDOW),  # in the future beyond the 5 s leeway
        ("1700000000", 401, Reason.PROOF_INVALID),
        (True, 401, Reason.PROOF_INVALID),
        (-(10**400), 401, Reason.PROOF_INVALID),  # would overflow float()
    ],
)
def test_a_wpt_iat_that_cannot_be_true_is_refused(iat: Any, status: int, reason: Reason) -> None:
    token = wit()
    proof = _resigned_wpt(token, {"iat": iat})
    req = view(
        path="/wimse/items",
        headers={"workload-identity-token": token, "authorization": f"WPT {proof}"},
    )
    denied(harness().decide(req), status, reason)


def test_a_wpt_iat_after_its_exp_is_refused() -> None:
    token = wit()
    proof = _resigned_wpt(token, {"iat": NOW - 1, "exp": NOW - 2})
    req = view(
        path="/wimse/items",
        headers={"workload-identity-token": token, "authorization": f"WPT {proof}"},
    )
    denied(harness().decide(req), 401, Reason.PROOF_INVALID)


def _resigned_wpt(token: str, changes: dict[str, Any]) -> str:
    """A WPT from SIGNER for /wimse/items with some claims replaced, signed again."""
    good = SIGNER.proof(url=ORIGIN + "/wimse/items", wit=token, now=NOW)
    h64, p64, _ = good.split(".")
    claims = {**json.loads(b64url_decode(p64)), **changes}
    payload = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{h64}.{payload}".encode("ascii")
    signature = sign("ES256", WORKLOAD_KEY, signing_input)
    return f"{h64}.{payload}.{b64url_encode(signature)}"


def test_a_wpt_exp_too_large_for_a_float_is_refused_not_a_crash() -> None:
    token = wit()
    proof = _resigned_wpt(token, {"exp": 10**400})
    req = view(
        path="/wimse/items",
        headers={"workload-identity-token": token, "authorization": f"WPT {proof}"},
    )
    denied(harness().decide(req), 401, Reason.PROOF_INVALID)
