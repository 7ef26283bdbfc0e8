"""The ``loop`` engine's pre-serialized CheckResponses are byte-for-byte what protobuf would
build from the same decision, whatever was cached before: only content-identical heads are
shared, and each decision's own dynamic metadata is appended."""

from __future__ import annotations

from envoy.service.auth.v3 import external_auth_pb2

from sidecar.authz.decision import Allow, Deny, Identity
from sidecar.authz.grpc_server import ResponseEncoder, render_check_response
from sidecar.errors import Reason

IDENTITY = Identity("spiffe://a/b", "https://iss", "dpop", "jkt1", None, "t1", "rule")


def allow(jti: str, sub: str = "spiffe://a/b", nonce: str = "") -> Allow:
    return Allow(
        IDENTITY,
        (("x-workload-id", sub), ("x-workload-auth", "dpop")),
        ("authorization", "dpop", "x-workload-role"),
        (("dpop-nonce", nonce),) if nonce else (),
        {"sub": sub, "proof_jti": jti, "rule": "r", "exp": 12},  # a non-string is left out
    )


def deny(detail: str, jti: str) -> Deny:
    return Deny(
        401,
        Reason.REPLAYED,
        detail,
        (("x-authz-reason", "replayed"), ("www-authenticate", 'DPoP error="x"')),
        '{"error": "invalid_dpop_proof"}',
        {"proof_jti": jti, "reason": "replayed", "note": "ünïcode"},
    )


def test_encoded_responses_equal_protobufs_own() -> None:
    encode = ResponseEncoder()
    decisions: list[Allow | Deny] = [
        allow("j1"),
        allow("j2"),  # same head (cached), other metadata
        allow("j3", sub="spiffe://other"),  # other head
        allow("j4", nonce="n1"),
        deny("this DPoP proof was already used", "j5"),
        deny("this DPoP proof was already used", "j6"),
        deny("other detail", "j7"),
        Allow(IDENTITY, (), (), (), {}),  # no metadata at all
    ]
    for decision in decisions:
        parsed = external_auth_pb2.CheckResponse.FromString(encode(decision))
        assert parsed == render_check_response(decision)
    assert len(encode._heads) == 6


def test_the_cache_is_bounded() -> None:
    encode = ResponseEncoder(size=3)
    for i in range(10):
        decision = allow(f"j{i}", sub=f"spiffe://s{i}")
        parsed = external_auth_pb2.CheckResponse.FromString(encode(decision))
        assert parsed == render_check_response(decision)
        assert len(encode._heads) <= 3
