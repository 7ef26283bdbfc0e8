"""The allow path: identity headers, stripped credentials, nonces, and the verified-token cache."""

from __future__ import annotations

from typing import Any

import pytest
from factory import (
    AUDIENCE,
    DROP,
    ES_ISSUER,
    FRONTEND,
    HOST,
    NOW,
    Harness,
    Issuer,
    as_allow,
    ec_key,
    ed_issuer,
    ed_key,
    es_issuer,
    header,
    key_store,
    make_harness,
    rsa_key,
    view,
)

import sidecar.authz.core as core
from sidecar.authz.core import PendingAllow
from sidecar.authz.decision import Allow, Deny
from sidecar.errors import Reason, ReplayStoreUnavailable
from sidecar.jose.rfc7517_jwk import import_public_jwk, public_jwk_dict
from sidecar.jose.rfc9068_access_token import verify_access_token
from sidecar.jose.rfc9449_dpop import ProofSigner


def allowed(decision: Any) -> Allow:
    assert isinstance(decision, Allow), f"expected Allow, got {decision!r}"
    return decision


# -- identity headers -------------------------------------------------------------------------


def test_dpop_allow_sets_identity_and_strips_credentials(h: Harness) -> None:
    allow = allowed(h.decide(h.dpop_request()))
    assert header(allow, "x-workload-id") == FRONTEND
    assert header(allow, "x-workload-issuer") == ES_ISSUER
    assert header(allow, "x-workload-auth") == "dpop"
    assert header(allow, "x-workload-jkt") == h.client.thumbprint
    assert header(allow, "x-workload-client-id") == "frontend"
    assert {"authorization", "dpop"} <= set(allow.headers_to_remove)
    assert allow.identity.subject == FRONTEND
    assert allow.identity.jkt == h.client.thumbprint
    assert allow.identity.rule == "frontend-orders"
    assert allow.response_headers == ()  # /orders does not use nonces


METHOD_OVERRIDES = ("x-http-method-override", "x-http-method", "x-method-override")


@pytest.mark.parametrize("request_kind", ["dpop", "bearer"])
def test_allow_strips_method_override_headers(h: Harness, request_kind: str) -> None:
    # The decision was for GET: a framework honouring an override would run DELETE instead.
    overrides = dict.fromkeys(METHOD_OVERRIDES, "DELETE")
    request = (
        h.dpop_request(headers=overrides)
        if request_kind == "dpop"
        else h.bearer_request(headers=overrides)
    )
    allow = allowed(h.decide(request))
    assert set(METHOD_OVERRIDES) <= set(allow.headers_to_remove)
    # Removed even when the authorizer never saw them (Envoy's HTTP mode forwards only a few
    # headers to it).
    assert set(METHOD_OVERRIDES) <= set(allowed(h.decide(h.dpop_request())).headers_to_remove)


def test_bearer_route_accepts_an_unbound_token(h: Harness) -> None:
    allow = allowed(h.decide(h.bearer_request(path="/public/info")))
    assert header(allow, "x-workload-id") == FRONTEND
    assert header(allow, "x-workload-auth") == "bearer"
    assert header(allow, "x-workload-jkt") is None
    assert {"authorization", "dpop"} <= set(allow.headers_to_remove)


def test_bound_token_with_dpop_on_a_bearer_route_is_dpop(h: Harness) -> None:
    allow = allowed(h.decide(h.dpop_request(path="/public/info")))
    assert header(allow, "x-workload-auth") == "dpop"


def test_spoofed_identity_headers_are_removed_or_overwritten(h: Harness) -> None:
    spoofed = {
        "x-workload-foo": "evil",
        "x-workload-id": "spiffe://demo.local/ns/shop/sa/admin",
        "x-workload-auth": "mtls",
    }
    allow = allowed(h.decide(h.dpop_request(headers=spoofed)))
    assert "x-workload-foo" in allow.headers_to_remove
    # Overwritten with the verified value (headers_to_set replaces the client's header).
    assert header(allow, "x-workload-id") == FRONTEND
    assert header(allow, "x-workload-auth") == "dpop"
    assert "x-workload-id" not in allow.headers_to_remove


def test_spoofed_jkt_on_a_bearer_request_is_removed(h: Harness) -> None:
    allow = allowed(h.decide(h.bearer_request(headers={"x-workload-jkt": "A" * 43})))
    assert "x-workload-jkt" in allow.headers_to_remove
    assert header(allow, "x-workload-jkt") is None


def test_client_id_header_removed_when_token_has_none(h: Harness) -> None:
    token = h.token(client_id=DROP)
    allow = allowed(h.decide(h.dpop_request(token=token, headers={"x-workload-client-id": "x"})))
    assert header(allow, "x-workload-client-id") is None
    assert "x-workload-client-id" in allow.headers_to_remove


# -- nonces ---------------------------------------------------------------------------------


def test_fresh_nonce_is_accepted_and_a_new_one_returned(h: Harness) -> None:
    allow = allowed(h.decide(h.dpop_request(path="/pay", nonce=h.nonce(NOW))))
    (name, value), *rest = allow.response_headers
    assert name == "dpop-nonce" and not rest
    assert h.nonces.check(value, NOW)


def test_nonce_from_the_previous_window_is_accepted(h: Harness) -> None:
    allowed(h.decide(h.dpop_request(path="/pay", nonce=h.nonce(NOW - 60))))


def test_nonce_on_a_route_without_nonces_is_ignored(h: Harness) -> None:
    allow = allowed(h.decide(h.dpop_request(nonce="anything")))
    assert allow.response_headers == ()


def test_challenge_then_retry_with_the_issued_nonce(h: Harness) -> None:
    deny = h.decide(h.dpop_request(path="/pay"))
    assert isinstance(deny, Deny) and deny.reason is Reason.NONCE_REQUIRED
    nonce = header(deny, "dpop-nonce")
    assert nonce is not None
    allowed(h.decide(h.dpop_request(path="/pay", nonce=nonce, now=NOW + 1), NOW + 1))


# -- htu comparison: what must still be allowed ---------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "authority", "path", "proof_url"),
    [
        ("https", HOST, "/orders?page=2&sort=asc", "https://orders.demo.local/orders"),
        ("https", HOST, "/orders", "https://orders.demo.local/orders?other=query#frag"),
        ("http", HOST + ":80", "/orders", "http://orders.demo.local/orders"),
        ("http", HOST, "/orders", "http://orders.demo.local:80/orders"),
        ("https", HOST + ":443", "/orders", "https://orders.demo.local/orders"),
        ("https", HOST, "/orders", "HTTPS://Orders.Demo.Local:443/orders"),
        ("https", HOST, "/orders/%7Euser", "https://orders.demo.local/orders/~user"),
    ],
    ids=[
        "query-on-request",
        "query-in-htu",
        "http-default-port-80-in-authority",
        "http-default-port-80-in-htu",
        "https-default-port-443",
        "case-insensitive-host",
        "percent-encoded-unreserved",
    ],
)
def test_equivalent_htu_is_allowed(
    h: Harness, scheme: str, authority: str, path: str, proof_url: str
) -> None:
    token = h.token()
    proof = h.proof(token, path=path, url=proof_url)
    request = view(
        path=path,
        scheme=scheme,
        authority=authority,
        headers={"authorization": f"DPoP {token}", "dpop": proof},
    )
    allowed(h.decide(request))


# -- tokens ---------------------------------------------------------------------------------


def test_expired_within_leeway_is_allowed(h: Harness) -> None:
    allowed(h.decide(h.dpop_request(token=h.token(now=NOW - 297))))  # exp = NOW - 3


def test_nbf_within_leeway_is_allowed(h: Harness) -> None:
    allowed(h.decide(h.dpop_request(token=h.token(nbf=int(NOW) + 4))))


def test_application_at_jwt_typ_is_accepted(h: Harness) -> None:
    allowed(h.decide(h.dpop_request(token=h.token(typ="application/at+JWT"))))


def test_audience_list_containing_ours(h: Harness) -> None:
    allowed(h.decide(h.dpop_request(token=h.token(aud=["other", AUDIENCE]))))


@pytest.mark.parametrize("alg", ["RS256", "PS256"])
def test_rsa_issuer_tokens(h: Harness, alg: str) -> None:
    rsa_iss = h.issuers[1]
    token = rsa_iss.token(alg=alg, jkt=h.client.thumbprint)
    allow = allowed(h.decide(h.dpop_request(token=token)))
    assert header(allow, "x-workload-issuer") == rsa_iss.iss


def test_ed25519_issuer_tokens(h: Harness) -> None:
    ed_iss = h.issuers[2]
    allow = allowed(h.decide(h.dpop_request(token=ed_iss.token(jkt=h.client.thumbprint))))
    assert header(allow, "x-workload-issuer") == ed_iss.iss


@pytest.mark.parametrize(
    ("key", "alg"),
    [
        (ec_key(3), "ES256"),
        (ed_key(3), "EdDSA"),
        (rsa_key("client"), "RS256"),
        (rsa_key("client"), "PS256"),
    ],
    ids=["ES256", "EdDSA", "RS256", "PS256"],
)
def test_proofs_with_each_supported_algorithm(h: Harness, key: Any, alg: str) -> None:
    signer = ProofSigner(key, alg)
    token = h.token(jkt=signer.thumbprint)
    allow = allowed(h.decide(h.dpop_request(token=token, signer=signer)))
    assert header(allow, "x-workload-jkt") == signer.thumbprint


def test_evaluate_returns_the_replay_key_and_window(h: Harness) -> None:
    pending = h.evaluate(h.dpop_request(jti="proof-jti-1"))
    assert isinstance(pending, PendingAllow)
    assert pending.replay_key == f"{h.client.thumbprint}:proof-jti-1"
    # Longer than proof_max_age + proof_future_leeway so the boundary instant is covered.
    assert pending.ttl > 65.0
    assert pending.allow.metadata["rule"] == "frontend-orders"


def test_same_jti_from_two_keys_is_not_a_replay(h: Harness) -> None:
    allowed(h.decide(h.dpop_request(jti="shared")))
    other = h.other_client
    allowed(
        h.decide(h.dpop_request(token=h.token(jkt=other.thumbprint), signer=other, jti="shared"))
    )


def test_replay_entry_expires_after_the_window(h: Harness) -> None:
    token = h.token(ttl=3600)
    request = h.dpop_request(token=token, now=NOW)
    allowed(h.decide(request, NOW))
    # Once the proof itself is too old it is refused for its age, not as a replay.
    later = h.decide(request, NOW + 61)
    assert isinstance(later, Deny) and later.reason is Reason.IAT_OUT_OF_WINDOW


# -- the verified-token cache ---------------------------------------------------------------


@pytest.fixture
def verify_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = verify_access_token

    def counting(token: str, **kw: Any) -> Any:
        calls.append(token)
        return real(token, **kw)

    monkeypatch.setattr(core, "verify_access_token", counting)
    return calls


def test_second_request_with_the_same_token_is_not_reverified(
    h: Harness, verify_calls: list[str]
) -> None:
    token = h.token()
    allowed(h.decide(h.dpop_request(token=token)))
    allowed(h.decide(h.dpop_request(token=token, now=NOW + 1), NOW + 1))
    assert verify_calls == [token]
    # The proof, by contrast, is verified on every request: a replay is still caught.
    request = h.dpop_request(token=token, now=NOW + 2)
    allowed(h.decide(request, NOW + 2))
    deny = h.decide(request, NOW + 2)
    assert isinstance(deny, Deny) and deny.reason is Reason.REPLAYED
    assert verify_calls == [token]


def test_cache_is_emptied_when_the_key_store_changes(h: Harness, verify_calls: list[str]) -> None:
    token = h.token()
    allowed(h.decide(h.dpop_request(token=token)))
    generation = h.keys.generation
    rotated = [
        import_public_jwk(h.issuer.jwk),
        import_public_jwk(public_jwk_dict(ec_key(2), kid="es-2")),
    ]
    assert h.keys.replace(ES_ISSUER, rotated)
    assert h.keys.generation != generation
    allowed(h.decide(h.dpop_request(token=token)))
    assert verify_calls == [token, token]


def test_withdrawn_key_is_not_served_from_the_cache(h: Harness) -> None:
    token = h.token()
    allowed(h.decide(h.dpop_request(token=token)))
    h.keys.replace(ES_ISSUER, [import_public_jwk(public_jwk_dict(ec_key(2), kid="es-2"))])
    deny = h.decide(h.dpop_request(token=token))
    assert isinstance(deny, Deny) and deny.reason is Reason.UNKNOWN_KEY


def test_cached_token_is_denied_after_its_exp(h: Harness, verify_calls: list[str]) -> None:
    token = h.token(ttl=10)  # exp = NOW + 10, leeway 5
    allowed(h.decide(h.dpop_request(token=token)))
    allowed(h.decide(h.dpop_request(token=token, now=NOW + 14), NOW + 14))
    deny = h.decide(h.dpop_request(token=token, now=NOW + 15), NOW + 15)
    assert isinstance(deny, Deny) and deny.reason is Reason.EXPIRED
    assert verify_calls == [token]  # the expiry came from the cached entry
    # ...and the entry is gone: the next attempt verifies again and is still refused.
    deny = h.decide(h.dpop_request(token=token, now=NOW + 16), NOW + 16)
    assert isinstance(deny, Deny) and deny.reason is Reason.EXPIRED
    assert verify_calls == [token, token]


def test_denied_tokens_are_not_cached(h: Harness, verify_calls: list[str]) -> None:
    token = h.token(typ="JWT")
    for _ in range(2):
        deny = h.decide(h.dpop_request(token=token))
        assert isinstance(deny, Deny) and deny.reason is Reason.WRONG_TYPE
    assert verify_calls == [token, token]


def test_token_cache_is_bounded() -> None:
    h = make_harness(token_cache_size=2)
    for i in range(5):
        allowed(h.decide(h.dpop_request(token=h.token(jti=f"t{i}"))))
    assert len(h.authz.token_cache) <= 2


# -- unknown kid: one refresh, one retry ----------------------------------------------------


def test_unknown_kid_triggers_one_refresh_and_retry(h: Harness) -> None:
    new_key = ec_key(2)
    refreshed: list[str | None] = []

    async def on_unknown_key(iss: str) -> bool:
        refreshed.append(iss)
        h.keys.replace(
            iss,
            [
                import_public_jwk(h.issuer.jwk),
                import_public_jwk(public_jwk_dict(new_key, kid="es-2")),
            ],
        )
        return True

    h.authz.on_unknown_key = on_unknown_key
    rotated = Issuer(ES_ISSUER, "ES256", "es-2", new_key, frozenset({"ES256"}))
    allowed(h.decide(h.dpop_request(token=rotated.token(jkt=h.client.thumbprint))))
    assert refreshed == [ES_ISSUER]


def test_unknown_kid_refresh_that_changes_nothing_denies(h: Harness) -> None:
    calls: list[str] = []

    async def on_unknown_key(iss: str) -> bool:
        calls.append(iss)
        return False

    h.authz.on_unknown_key = on_unknown_key
    deny = h.decide(h.dpop_request(token=h.token(kid="nope")))
    assert isinstance(deny, Deny) and deny.reason is Reason.UNKNOWN_KEY
    assert calls == [ES_ISSUER]


# -- bearer requests and the replay store ---------------------------------------------------


class NxStore:
    """A replay store with Redis ``SET key 1 NX PX ttl`` semantics (PX at least 1 ms), as the
    shared store has; it records every call. Not an InMemoryReplayStore, so decide() awaits it."""

    def __init__(self, *, down: bool = False) -> None:
        self.down = down
        self.calls: list[tuple[str, float]] = []
        self._until: dict[str, float] = {}

    async def check_and_insert(self, key: str, now: float, ttl: float) -> bool:
        self.calls.append((key, ttl))
        if self.down:
            raise ReplayStoreUnavailable("redis: ConnectionError")
        if self._until.get(key, -1.0) > now:
            return False
        self._until[key] = now + max(0.001, ttl)
        return True

    def size(self) -> int:
        return len(self._until)

    epoch = NOW - 3600  # started long ago


def test_dpop_requests_use_an_async_replay_store() -> None:
    store = NxStore()
    h = make_harness(replay=store)
    request = h.dpop_request()
    allowed(h.decide(request))
    deny = h.decide(request)
    assert isinstance(deny, Deny) and deny.reason is Reason.REPLAYED
    assert len(store.calls) == 2


def test_async_replay_store_down_fails_closed() -> None:
    h = make_harness(replay=NxStore(down=True))
    deny = h.decide(h.dpop_request())
    assert isinstance(deny, Deny) and deny.reason is Reason.REPLAY_STORE_UNAVAILABLE
    assert deny.status == 503


def test_two_bearer_requests_at_the_same_instant_are_both_allowed() -> None:
    store = NxStore()
    h = make_harness(replay=store)
    allowed(h.decide(h.bearer_request()))
    allowed(h.decide(h.bearer_request()))


def test_bearer_request_does_not_depend_on_the_replay_store() -> None:
    store = NxStore(down=True)
    h = make_harness(replay=store)
    allowed(h.decide(h.bearer_request()))
    assert store.calls == []


def test_proof_is_not_accepted_twice_at_the_end_of_its_window(h: Harness) -> None:
    token = h.token(ttl=3600)
    request = h.dpop_request(token=token, now=NOW + 5)  # iat at the future-leeway edge
    allowed(h.decide(request, NOW))
    again = h.decide(request, NOW + 65)
    assert isinstance(again, Deny)


def test_key_store_helper_builds_one_generation_per_issuer() -> None:
    store = key_store(es_issuer(), ed_issuer())
    assert store.generation == 2
    assert store.key_count() == 2


def test_pending_allow_unwraps(h: Harness) -> None:
    assert as_allow(h.evaluate(h.dpop_request())).identity.subject == FRONTEND
