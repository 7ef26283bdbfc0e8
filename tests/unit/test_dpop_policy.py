"""One DPoP acceptance policy (RFC 9449 §4.3 step 11, §11.1) for the ingress and the broker:
the same configuration gives the same policy, and a proof stays refused as a replay for as long
as it is acceptable at all — on both sides, including the boundary instant iat + max_age."""

from __future__ import annotations

import pytest
from factory import NOW, UNIX_ENTRY, ec_key, make_broker, make_harness

from sidecar.authz.config import parse_authz_config
from sidecar.authz.decision import Allow, Deny
from sidecar.broker.config import parse_broker_config
from sidecar.broker.oauth import OAuthError
from sidecar.errors import Reason
from sidecar.jose.rfc9449_dpop import DPoPPolicy, ProofSigner

TOKEN_URL = "http://127.0.0.1:8443/token"


def test_ingress_and_broker_read_the_same_policy_from_the_same_settings() -> None:
    dpop = {"algorithms": ["ES256", "PS256"], "max_age": 30, "future_leeway": 2}
    broker = parse_broker_config(
        {"entries": [UNIX_ENTRY], "dpop": {**dpop, "max_proof_bytes": 2048}}
    )
    authz = parse_authz_config(
        {
            "audience": "a",
            "issuers": [{"issuer": "https://i.example", "jwks_uri": "https://i.example/k"}],
            "dpop": dpop,
            "limits": {"max_proof_bytes": 2048},
        }
    )
    assert broker.dpop == authz.settings.dpop
    assert broker.dpop == DPoPPolicy(frozenset({"ES256", "PS256"}), 30.0, 2.0, 2048)
    # And the defaults agree too.
    default_broker = parse_broker_config({"entries": [UNIX_ENTRY]})
    assert default_broker.dpop == DPoPPolicy()


def test_replay_ttl_covers_a_future_proof_until_its_last_acceptable_instant() -> None:
    policy = DPoPPolicy(max_age=60, future_leeway=5)
    # Accepted at t with iat = t + 5, still acceptable at iat + 60 = t + 65 (inclusive); the
    # store forgets at exactly its expiry, so the entry must outlive t + 65.
    assert policy.replay_ttl > 65.0


def test_broker_refuses_a_replay_at_exactly_iat_plus_max_age() -> None:
    broker = make_broker()
    signer = ProofSigner(ec_key(51))
    iat = NOW + 5  # as far ahead as future_leeway allows
    proof = signer.proof(method="POST", url=TOKEN_URL, now=iat)
    assert broker.verify_dpop([proof], TOKEN_URL, NOW).jti
    last = iat + broker.cfg.dpop.max_age  # the proof's own iat check still passes here
    with pytest.raises(OAuthError) as err:
        broker.verify_dpop([proof], TOKEN_URL, last)
    assert err.value.reason == "replayed"
    # One second later it is refused for its age, no longer as a replay.
    with pytest.raises(OAuthError) as err:
        broker.verify_dpop([proof], TOKEN_URL, last + 1)
    assert err.value.reason == Reason.IAT_OUT_OF_WINDOW.value


def test_ingress_refuses_a_replay_at_exactly_iat_plus_max_age() -> None:
    h = make_harness()
    token = h.token(ttl=3600)
    iat = NOW + 5
    request = h.dpop_request(token=token, now=iat)
    assert isinstance(h.decide(request, NOW), Allow)
    replay = h.decide(request, iat + h.authz.settings.dpop.max_age)
    assert isinstance(replay, Deny) and replay.reason is Reason.REPLAYED
