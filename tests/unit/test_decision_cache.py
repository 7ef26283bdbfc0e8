"""The bearer decision cache never answers differently from the core deciding again.

Two authorizers share keys, policy, revocations and settings; one has the decision cache, the
other has it switched off. Random sequences of checks (bearer tokens valid, bound, expiring,
of an intruder; paths on bearer, DPoP and nonce routes, ambiguous ones; spoofed identity
headers) are interleaved with what changes the world (time passing, revocations of a subject
or a token id, a policy reload, a key rotation, new settings), and every decision must be the
same on both.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from factory import (
    ES_ISSUER,
    FRONTEND,
    INTRUDER,
    NOW,
    POLICY_CONFIG,
    ec_key,
    make_harness,
    view,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.authz.core import DECISION_KEY_MAX, Authorizer, PendingAllow
from sidecar.authz.decision import Deny
from sidecar.authz.decision_cache import DecisionCache
from sidecar.authz.policy import Policy
from sidecar.jose.rfc7517_jwk import import_public_jwk, public_jwk_dict

H = make_harness(
    policy_config={
        **POLICY_CONFIG,
        "routes": [
            {"prefix": "/public", "auth": "bearer"},
            {"prefix": "/pay", "nonce": True},
            {"prefix": "/open", "auth": "bearer", "nonce": True},
        ],
    }
)
TOKENS = {
    "frontend": H.token(bound=False, jti="t-frontend"),
    "frontend-short": H.token(bound=False, jti="t-short", ttl=20),
    "frontend-other-jti": H.token(bound=False, jti="t-frontend-2"),
    "intruder": H.token(bound=False, sub=INTRUDER, jti="t-intruder"),
    "bound": H.token(jti="t-bound"),
}
PATHS = ["/public/info", "/public/info?a=1", "/public/../orders", "/orders", "/pay", "/open/x"]
POLICIES = [
    H.policy,
    Policy.from_config({"routes": [{"prefix": "/public", "auth": "bearer"}], "rules": []}),
    Policy.from_config(
        {
            "routes": [{"prefix": "/", "auth": "bearer"}],
            "rules": [{"name": "any", "principals": ["**"], "paths": ["/"]}],
        }
    ),
]
OTHER_KEY = import_public_jwk(public_jwk_dict(ec_key(42), kid="es-1"))
ORIGINAL_KEY = import_public_jwk(H.issuer.jwk)

# Weighted towards requests the core allows: those are what the cache keeps.
FIELDS = {
    "token": st.sampled_from(["frontend"] * 4 + sorted(TOKENS)),
    "method": st.sampled_from(["GET", "GET", "POST", "DELETE"]),
    "path": st.sampled_from(["/public/info"] * 3 + PATHS),
    "spoofed": st.sampled_from([(), ("x-workload-id",), ("x-workload-id", "x-workload-evil")]),
    "scheme": st.sampled_from(["Bearer", "Bearer", "bearer", "DPoP"]),
}
request_spec = st.fixed_dictionaries(FIELDS)
# A check is one of a few requests of the example, or one of them with one field changed: the
# same key asked again, and keys that differ in exactly one part, are both frequent.
request_op = st.tuples(
    st.just("check"),
    st.integers(0, 2),
    st.one_of(
        st.none(),
        st.sampled_from(sorted(FIELDS)).flatmap(
            lambda name: st.tuples(st.just(name), FIELDS[name])
        ),
    ),
)
world_op = st.one_of(
    st.tuples(st.just("time"), st.sampled_from([1.0, 10.0, 30.0, 400.0])),
    st.tuples(st.just("revoke-sub"), st.sampled_from([FRONTEND, INTRUDER])),
    st.tuples(st.just("revoke-jti"), st.sampled_from(["t-frontend", "t-short"])),
    st.tuples(st.just("unrevoke"), st.none()),
    st.tuples(st.just("policy"), st.sampled_from([0, 0, 1, 2])),
    st.tuples(st.just("keys"), st.sampled_from(["other", "original", "original"])),
    st.tuples(st.just("leeway"), st.sampled_from([0.0, 5.0, 60.0])),
)


def uncached_twin(cached: Authorizer) -> Authorizer:
    """An authorizer on the same keys, policy, revocations and settings, deciding every time."""
    fresh = Authorizer(
        cached.settings,
        keys=cached.keys,
        policy=cached.policy,
        replay=cached.replay,
        nonces=cached.nonces,
        revocations=cached.revocations,
        clock=cached.clock,
    )
    fresh.decisions = DecisionCache(0)
    return fresh


def pair() -> tuple[Authorizer, Authorizer]:
    return H.authz, uncached_twin(H.authz)


def outcome(result: Deny | PendingAllow) -> tuple[Any, ...]:
    if isinstance(result, Deny):
        return ("deny", result.status, result.reason, result.headers, result.body)
    allow = result.allow
    return (
        "allow",
        result.replay_key,
        allow.identity,
        allow.headers_to_set,
        allow.headers_to_remove,
        allow.response_headers,
        dict(allow.metadata),
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(request_spec, min_size=3, max_size=3),
    st.lists(st.one_of(request_op, request_op, request_op, world_op), min_size=10, max_size=40),
)
def test_cached_decisions_equal_the_core_deciding_again(
    pool: list[dict[str, Any]], ops: list[tuple[Any, ...]]
) -> None:
    cached, fresh = pair()
    cached.decisions = DecisionCache(64)
    cached.keys.replace(ES_ISSUER, [ORIGINAL_KEY])
    cached.revocations.replace(subjects=frozenset(), jtis=frozenset(), version=None)
    cached.policy = fresh.policy = H.policy
    now = NOW
    for op in ops:
        kind, arg = op[0], op[1]
        if kind == "check":
            spec = dict(pool[arg])
            if op[2] is not None:
                spec[op[2][0]] = op[2][1]
            headers = {"authorization": f"{spec['scheme']} {TOKENS[spec['token']]}"}
            headers.update({name: "forged" for name in spec["spoofed"]})
            request = view(method=spec["method"], path=spec["path"], headers=headers)
            assert outcome(cached.evaluate(request, now)) == outcome(fresh.evaluate(request, now))
        elif kind == "time":
            now += arg
        elif kind == "revoke-sub":
            revs = cached.revocations
            revs.replace(subjects=revs.subjects | {arg}, jtis=revs.jtis, version=None)
        elif kind == "revoke-jti":
            revs = cached.revocations
            revs.replace(subjects=revs.subjects, jtis=revs.jtis | {arg}, version=None)
        elif kind == "unrevoke":
            cached.revocations.replace(subjects=frozenset(), jtis=frozenset(), version=None)
        elif kind == "policy":
            cached.policy = fresh.policy = POLICIES[arg]
        elif kind == "keys":
            cached.keys.replace(ES_ISSUER, [OTHER_KEY if arg == "other" else ORIGINAL_KEY])
        elif kind == "leeway":
            new = dataclasses.replace(cached.settings, leeway=arg)
            cached.settings = fresh.settings = new
    cached.settings = fresh.settings = H.authz.settings


def fresh_pair() -> tuple[Authorizer, Authorizer]:
    """A new cached/uncached pair on the same keys as ``TOKENS`` (deterministic issuer key)."""
    h = make_harness(policy_config=POLICY_CONFIG)
    return h.authz, uncached_twin(h.authz)


def request_of(spec: dict[str, Any]) -> Any:
    headers = {"authorization": f"{spec['scheme']} {TOKENS[spec['token']]}"}
    headers.update({name: "forged" for name in spec["spoofed"]})
    return view(method=spec["method"], path=spec["path"], headers=headers)


BASES = [
    {
        "token": "frontend",
        "method": "GET",
        "path": "/public/info",
        "spoofed": (),
        "scheme": "Bearer",
    },
    {
        "token": "frontend-short",
        "method": "POST",
        "path": "/public/info?a=1",
        "spoofed": ("x-workload-id",),
        "scheme": "bearer",
    },
]
VARIANTS: dict[str, list[Any]] = {
    "token": sorted(TOKENS),
    "method": ["GET", "POST", "DELETE", "PUT"],
    "path": PATHS,
    "spoofed": [(), ("x-workload-id",), ("x-workload-evil",), ("x-workload-id", "x-workload-a")],
    "scheme": ["Bearer", "bearer", "DPoP"],
}


def test_a_request_differing_in_one_part_is_decided_again() -> None:
    for base in BASES:
        for name, values in VARIANTS.items():
            for value in values:
                cached, fresh = fresh_pair()
                first = request_of(base)
                assert isinstance(cached.evaluate(first, NOW), PendingAllow)
                variant = request_of({**base, name: value})
                got, want = cached.evaluate(variant, NOW), fresh.evaluate(variant, NOW)
                assert outcome(got) == outcome(want), (name, value)


def _revoke_sub(a: Authorizer, f: Authorizer) -> None:
    a.revocations.replace(subjects=frozenset({FRONTEND}), jtis=frozenset(), version="1")


def _revoke_jti(a: Authorizer, f: Authorizer) -> None:
    a.revocations.replace(subjects=frozenset(), jtis=frozenset({"t-frontend"}), version="1")


def _reload_policy(a: Authorizer, f: Authorizer) -> None:
    a.policy = f.policy = POLICIES[1]


def _rotate_keys(a: Authorizer, f: Authorizer) -> None:
    a.keys.replace(ES_ISSUER, [OTHER_KEY])


def _new_settings(a: Authorizer, f: Authorizer) -> None:
    a.settings = f.settings = dataclasses.replace(a.settings, max_token_bytes=64)


WORLD_CHANGES = [_revoke_sub, _revoke_jti, _reload_policy, _rotate_keys, _new_settings]


def test_a_change_of_the_world_reaches_a_cached_allow() -> None:
    for change in WORLD_CHANGES:
        cached, fresh = fresh_pair()
        request = request_of(BASES[0])
        assert isinstance(cached.evaluate(request, NOW), PendingAllow)
        change(cached, fresh)
        got, want = cached.evaluate(request, NOW), fresh.evaluate(request, NOW)
        assert isinstance(want, Deny), change.__name__
        assert outcome(got) == outcome(want), change.__name__


def test_a_repeated_bearer_check_is_answered_from_the_cache() -> None:
    h = make_harness()
    request = h.bearer_request()
    first = h.evaluate(request)
    assert isinstance(first, PendingAllow)
    assert len(h.authz.decisions) == 1
    assert h.evaluate(request) is first  # the same object: nothing decided again
    # A spoofed identity header changes what the allow strips: another entry.
    # A spoofed identity header changes what the allow strips: decided, never cached.
    spoofed = h.bearer_request(headers={"x-workload-role": "admin"})
    other = h.evaluate(spoofed)
    assert isinstance(other, PendingAllow) and other is not first
    assert "x-workload-role" not in first.allow.headers_to_remove
    assert "x-workload-role" in other.allow.headers_to_remove
    assert h.evaluate(spoofed) is not other
    assert len(h.authz.decisions) == 1


def test_a_long_path_is_decided_but_not_kept() -> None:
    h = make_harness()
    token = h.token(bound=False)
    long = h.bearer_request(path="/public/" + "a" * DECISION_KEY_MAX, token=token)
    assert isinstance(h.evaluate(long), PendingAllow)
    assert len(h.authz.decisions) == 0


def test_revocation_policy_reload_and_expiry_reach_a_cached_allow() -> None:
    h = make_harness()
    token = h.token(bound=False, ttl=60)
    request = h.bearer_request(token=token)
    assert isinstance(h.evaluate(request), PendingAllow)
    h.revocations.replace(subjects=frozenset({FRONTEND}), jtis=frozenset(), version="1")
    revoked = h.evaluate(request)
    assert isinstance(revoked, Deny) and revoked.reason.value == "revoked"
    h.revocations.replace(subjects=frozenset(), jtis=frozenset(), version="2")
    assert isinstance(h.evaluate(request), PendingAllow)
    h.authz.policy = Policy.from_config(
        {"routes": [{"prefix": "/public", "auth": "bearer"}], "rules": []}
    )
    denied = h.evaluate(request)
    assert isinstance(denied, Deny) and denied.reason.value == "policy_denied"
    h.authz.policy = h.policy
    assert isinstance(h.evaluate(request), PendingAllow)
    late = h.evaluate(request, NOW + 60 + h.authz.settings.leeway)
    assert isinstance(late, Deny) and late.reason.value == "expired"


def test_nonce_routes_and_proofs_are_never_cached() -> None:
    h = make_harness(
        policy_config={
            **POLICY_CONFIG,
            "routes": [
                {"prefix": "/public", "auth": "bearer", "nonce": True},
            ],
        }
    )
    first = h.evaluate(h.bearer_request())
    assert isinstance(first, PendingAllow) and first.allow.response_headers  # a DPoP-Nonce
    assert len(h.authz.decisions) == 0
    dpop = h.evaluate(h.dpop_request())
    assert isinstance(dpop, PendingAllow) and dpop.replay_key
    assert len(h.authz.decisions) == 0


def test_the_cache_is_bounded() -> None:
    h = make_harness(token_cache_size=3)
    token = h.token(bound=False)
    for i in range(10):
        assert isinstance(
            h.evaluate(h.bearer_request(path=f"/public/{i}", token=token)), PendingAllow
        )
    assert len(h.authz.decisions) == 3
