"""Stateless nonces (RFC 9449 §8), the in-memory replay store (§11.1) and the ingress policy."""

from __future__ import annotations

from typing import Any

import pytest
from factory import NOW, POLICY_CONFIG

from sidecar.authz.nonce import NONCE_LENGTH, NonceService
from sidecar.authz.policy import Policy, canonical_path, empty_policy
from sidecar.authz.replay import InMemoryReplayStore
from sidecar.errors import ConfigError, ReplayStoreUnavailable
from sidecar.jose.b64 import b64url_decode, b64url_encode

SECRET = b"0123456789abcdef-shared-by-replicas"
WINDOW = 60.0
#: The start of a nonce window, so "the next window" is unambiguous.
T0 = (NOW // WINDOW) * WINDOW

# -- nonces ---------------------------------------------------------------------------------


@pytest.fixture
def nonces() -> NonceService:
    return NonceService(SECRET, window=WINDOW)


@pytest.mark.parametrize(
    ("issued", "checked", "valid"),
    [
        (T0, T0, True),
        (T0, T0 + WINDOW - 0.001, True),  # same window, its last instant
        (T0 + WINDOW - 0.001, T0 + WINDOW, True),  # issued at the very end, next window
        (T0, T0 + WINDOW, True),  # the next window
        (T0, T0 + 2 * WINDOW - 0.001, True),  # the next window, its last instant
        (T0, T0 + 2 * WINDOW, False),  # two windows later
        (T0, T0 + 10 * WINDOW, False),
        (T0 + WINDOW, T0, False),  # from the future
    ],
    ids=[
        "same-instant",
        "end-of-window",
        "issued-at-window-end",
        "next-window",
        "end-of-next-window",
        "two-windows-later",
        "much-later",
        "from-the-future",
    ],
)
def test_nonce_windows(nonces: NonceService, issued: float, checked: float, valid: bool) -> None:
    assert nonces.check(nonces.issue(issued), checked) is valid


def test_nonce_shape_and_reuse_within_a_window(nonces: NonceService) -> None:
    nonce = nonces.issue(T0)
    assert len(nonce) == NONCE_LENGTH
    assert len(b64url_decode(nonce)) == 24  # 8-byte counter + 16-byte MAC
    assert nonces.issue(T0 + 30) == nonce
    assert nonces.issue(T0 + WINDOW) != nonce


def test_nonce_issue_is_stable_when_time_goes_back(nonces: NonceService) -> None:
    later = nonces.issue(T0 + WINDOW)
    earlier = nonces.issue(T0)
    assert later != earlier
    assert nonces.issue(T0 + WINDOW) == later


def test_replicas_sharing_the_secret_accept_each_others_nonces() -> None:
    a, b = NonceService(SECRET, window=WINDOW), NonceService(SECRET, window=WINDOW)
    assert b.check(a.issue(T0), T0 + 1)


@pytest.mark.parametrize(
    "other",
    [
        NonceService(b"another secret of the right size", window=WINDOW),
        NonceService(SECRET, window=WINDOW, context="another-service"),
    ],
    ids=["other-secret", "other-context"],
)
def test_nonce_from_another_service_is_refused(nonces: NonceService, other: NonceService) -> None:
    assert not nonces.check(other.issue(T0), T0)


def _tamper(nonce: str, index: int) -> str:
    raw = bytearray(b64url_decode(nonce))
    raw[index] ^= 0x01
    return b64url_encode(bytes(raw))


@pytest.mark.parametrize(
    "index", [0, 7, 8, 23], ids=["counter-high", "counter-low", "mac-first", "mac-last"]
)
def test_tampered_nonce_is_refused(nonces: NonceService, index: int) -> None:
    assert not nonces.check(_tamper(nonces.issue(T0), index), T0)


def test_nonce_with_a_forged_later_counter_is_refused(nonces: NonceService) -> None:
    raw = bytearray(b64url_decode(nonces.issue(T0)))
    counter = int.from_bytes(raw[:8], "big") + 5
    forged = b64url_encode(counter.to_bytes(8, "big") + bytes(raw[8:]))
    assert not nonces.check(forged, T0 + 5 * WINDOW)


@pytest.mark.parametrize(
    "nonce",
    ["", "a", "A" * 31, "A" * 33, "A" * 32, "=" * 32, "é" * 32, " " * 32, "A" * 10_000, "+" * 32],
    ids=[
        "empty",
        "one",
        "31",
        "33",
        "right-length-garbage",
        "padding",
        "non-ascii",
        "spaces",
        "huge",
        "plus",
    ],
)
def test_malformed_nonce_is_refused(nonces: NonceService, nonce: str) -> None:
    assert nonces.check(nonce, T0) is False


def test_wrong_length_variants_of_a_valid_nonce(nonces: NonceService) -> None:
    nonce = nonces.issue(T0)
    for variant in (nonce[:-1], nonce + "A", nonce + "=", " " + nonce, nonce + "\n"):
        assert not nonces.check(variant, T0)


@pytest.mark.parametrize(
    ("secret", "window"),
    [(b"short", 60.0), (b"x" * 16, 0.0), (b"x" * 16, -1.0)],
    ids=["short-secret", "zero-window", "negative-window"],
)
def test_nonce_service_refuses_bad_settings(secret: bytes, window: float) -> None:
    with pytest.raises(ValueError):
        NonceService(secret, window=window)


# -- the in-memory replay store -------------------------------------------------------------

TTL = 65.0


def test_replay_same_key_refused_within_ttl() -> None:
    store = InMemoryReplayStore()
    assert store.check_and_insert_sync("jkt:a", NOW, TTL)
    assert not store.check_and_insert_sync("jkt:a", NOW, TTL)
    assert not store.check_and_insert_sync("jkt:a", NOW + TTL - 0.001, TTL)
    assert store.check_and_insert_sync("jkt:b", NOW, TTL)
    assert store.size() == 2


def test_replay_key_is_accepted_again_after_expiry() -> None:
    store = InMemoryReplayStore()
    assert store.check_and_insert_sync("k", NOW, TTL)
    assert store.check_and_insert_sync("k", NOW + TTL + 1, TTL)
    assert not store.check_and_insert_sync("k", NOW + TTL + 2, TTL)


def test_expiry_frees_capacity() -> None:
    store = InMemoryReplayStore(capacity=3)
    for i in range(3):
        assert store.check_and_insert_sync(f"k{i}", NOW + i, TTL)
    with pytest.raises(ReplayStoreUnavailable):
        store.check_and_insert_sync("k3", NOW + 3, TTL)
    # k0 expires at NOW + TTL; k1 and k2 are still live.
    assert store.check_and_insert_sync("k3", NOW + TTL, TTL)
    assert store.size() == 3
    with pytest.raises(ReplayStoreUnavailable):
        store.check_and_insert_sync("k4", NOW + TTL, TTL)


def test_full_store_never_evicts_a_live_entry() -> None:
    store = InMemoryReplayStore(capacity=2)
    assert store.check_and_insert_sync("a", NOW, TTL)
    assert store.check_and_insert_sync("b", NOW, TTL)
    for i in range(10):
        with pytest.raises(ReplayStoreUnavailable):
            store.check_and_insert_sync(f"new{i}", NOW + 1, TTL)
    # The live entries are still there: their replays are still caught, not "full".
    assert not store.check_and_insert_sync("a", NOW + 2, TTL)
    assert not store.check_and_insert_sync("b", NOW + 2, TTL)
    assert store.size() == 2


def test_replay_of_a_known_key_is_reported_even_when_full() -> None:
    store = InMemoryReplayStore(capacity=1)
    assert store.check_and_insert_sync("a", NOW, TTL)
    assert store.check_and_insert_sync("a", NOW, TTL) is False


def test_many_entries_expire_together() -> None:
    store = InMemoryReplayStore(capacity=1000)
    for i in range(1000):
        assert store.check_and_insert_sync(f"k{i}", NOW + i / 1000, TTL)
    assert store.check_and_insert_sync("late", NOW + TTL + 1, TTL)
    assert store.size() == 1


def test_async_interface_matches_sync() -> None:
    import asyncio

    store = InMemoryReplayStore()
    assert asyncio.run(store.check_and_insert("k", NOW, TTL)) is True
    assert asyncio.run(store.check_and_insert("k", NOW, TTL)) is False


def test_replay_store_refuses_zero_capacity() -> None:
    with pytest.raises(ValueError):
        InMemoryReplayStore(capacity=0)


# -- policy configuration -------------------------------------------------------------------


def _rule(**overrides: Any) -> dict[str, Any]:
    return {"principals": ["spiffe://x/y"], "paths": ["/"], **overrides}


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"rules": [_rule(methods=["GET", "FETCH"])]}, "authz.rules[0].methods"),
        ({"rules": [_rule(methods=5)]}, "authz.rules[0].methods"),
        ({"rules": [_rule(), _rule(methods=["GET", ""])]}, "authz.rules[1].methods"),
        ({"rules": [_rule(paths=["orders"])]}, "authz.rules[0].paths"),
        ({"rules": [_rule(paths=[3])]}, "authz.rules[0].paths"),
        ({"rules": [{"paths": ["/"]}]}, "authz.rules[0].principals"),
        ({"rules": [_rule(name="")]}, "authz.rules[0].name"),
        ({"rules": [_rule(verbs=["GET"])]}, "authz.rules[0].verbs"),
        ({"rules": ["not a mapping"]}, "authz.rules[0]"),
        ({"routes": [{"prefix": "public"}]}, "authz.routes[0].prefix"),
        ({"routes": [{}]}, "authz.routes[0].prefix"),
        ({"routes": [{"prefix": "/a", "auth": "mtls"}]}, "authz.routes[0].auth"),
        ({"routes": [{"prefix": "/a", "nonce": "yes"}]}, "authz.routes[0].nonce"),
        ({"routes": [{"prefix": "/a", "bearer": True}]}, "authz.routes[0].bearer"),
        ("not a mapping", "authz"),
    ],
    ids=[
        "unknown-method",
        "methods-not-a-list",
        "second-rule-empty-method",
        "path-not-absolute",
        "path-not-a-string",
        "principals-missing",
        "name-empty",
        "unknown-rule-key",
        "rule-not-a-mapping",
        "prefix-not-absolute",
        "prefix-missing",
        "auth-unknown",
        "nonce-not-bool",
        "unknown-route-key",
        "root-not-a-mapping",
    ],
)
def test_policy_config_errors_name_the_key(config: Any, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Policy.from_config(config)
    assert info.value.key == key
    assert str(info.value).startswith(key)


def test_policy_config_error_uses_the_given_root_path() -> None:
    with pytest.raises(ConfigError) as info:
        Policy.from_config({"rules": [_rule(methods=["BREW"])]}, "ingress.policy")
    assert info.value.key == "ingress.policy.rules[0].methods"


@pytest.mark.parametrize("field", ["rules", "routes"])
@pytest.mark.parametrize("value", [5, "abc", {"name": "x"}], ids=["int", "str", "mapping"])
def test_policy_rules_and_routes_must_be_lists(field: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        Policy.from_config({field: value})
    assert info.value.key == f"authz.{field}"


def test_methods_wildcards_and_case() -> None:
    policy = Policy.from_config(
        {
            "rules": [
                _rule(name="any-list", methods=["*"], paths=["/a"]),
                _rule(name="any-str", methods="*", paths=["/b"]),
                _rule(name="lower", methods=["get"], paths=["/c"]),
                _rule(name="absent", paths=["/d"]),
            ]
        }
    )
    assert _rule_name(policy, "spiffe://x/y", "DELETE", "/a") == "any-list"
    assert _rule_name(policy, "spiffe://x/y", "PATCH", "/b") == "any-str"
    assert _rule_name(policy, "spiffe://x/y", "GET", "/c") == "lower"
    assert policy.allowing_rule("spiffe://x/y", "POST", "/c") is None
    assert _rule_name(policy, "spiffe://x/y", "OPTIONS", "/d") == "absent"


def test_empty_policy_denies_everything() -> None:
    policy = empty_policy()
    assert policy.allowing_rule("spiffe://x/y", "GET", "/") is None
    assert policy.route_for("/anything").auth == "dpop"


# -- principal globs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "principal", "matches"),
    [
        (
            "spiffe://demo.local/ns/shop/sa/frontend",
            "spiffe://demo.local/ns/shop/sa/frontend",
            True,
        ),
        (
            "spiffe://demo.local/ns/shop/sa/frontend",
            "spiffe://demo.local/ns/shop/sa/frontend2",
            False,
        ),
        (
            "spiffe://demo.local/ns/shop/sa/frontend",
            "spiffe://demo.local/ns/shop/sa/fronten",
            False,
        ),
        ("spiffe://demo.local/ns/*/sa/frontend", "spiffe://demo.local/ns/shop/sa/frontend", True),
        ("spiffe://demo.local/ns/*/sa/frontend", "spiffe://demo.local/ns/a/b/sa/frontend", False),
        ("spiffe://demo.local/ns/shop/sa/*", "spiffe://demo.local/ns/shop/sa/anything", True),
        ("spiffe://demo.local/ns/shop/sa/*", "spiffe://demo.local/ns/shop/sa/a/b", False),
        ("spiffe://demo.local/ns/shop/sa/front*", "spiffe://demo.local/ns/shop/sa/frontend", True),
        ("spiffe://demo.local/ns/shop/**", "spiffe://demo.local/ns/shop/sa/a/b/c", True),
        ("spiffe://demo.local/ns/shop/**", "spiffe://demo.local/ns/shopping/sa/x", False),
        ("spiffe://demo.local/**", "spiffe://demo.local.evil/ns/x", False),
        ("spiffe://demo.local/**", "spiffe://evil/spiffe://demo.local/x", False),
        ("spiffe://demo.local/ns/shop.sa/x", "spiffe://demo.local/ns/shopXsa/x", False),
    ],
    ids=[
        "exact",
        "exact-longer",
        "exact-shorter",
        "star-in-segment",
        "star-not-across",
        "star-last-segment",
        "star-last-not-across",
        "star-suffix",
        "double-star-across",
        "double-star-segment-boundary",
        "double-star-other-domain",
        "anchored-at-start",
        "dot-is-literal",
    ],
)
def test_principal_globs(pattern: str, principal: str, matches: bool) -> None:
    policy = Policy.from_config({"rules": [{"principals": [pattern], "paths": ["/"]}]})
    assert (policy.allowing_rule(principal, "GET", "/") is not None) is matches


# -- routes and paths -----------------------------------------------------------------------


def test_longest_route_prefix_wins_regardless_of_order() -> None:
    config = {
        "routes": [
            {"prefix": "/api", "auth": "bearer"},
            {"prefix": "/api/payments/refunds", "nonce": True, "auth": "dpop"},
            {"prefix": "/api/payments", "auth": "dpop"},
        ]
    }
    policy = Policy.from_config(config)
    assert policy.route_for("/api/payments/refunds/7").prefix == "/api/payments/refunds"
    assert policy.route_for("/api/payments/refunds/7").nonce is True
    assert policy.route_for("/api/payments/1").prefix == "/api/payments"
    assert policy.route_for("/api/paymentsX").prefix == "/api"
    assert policy.route_for("/api").auth == "bearer"
    assert policy.route_for("/apix") == policy.default_route
    assert policy.default_route.prefix == "/" and policy.default_route.auth == "dpop"


def test_nonce_default_applies_to_routes_and_default_route() -> None:
    policy = Policy.from_config({"routes": [{"prefix": "/a"}]}, nonce_default=True)
    assert policy.route_for("/a").nonce and policy.default_route.nonce


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/orders", True),
        ("/orders/42", True),
        ("/orders/", True),
        ("/ordersX", False),
        ("/order", False),
        ("/Orders", False),
        ("/", False),
        ("/pay/now", True),
    ],
    ids=[
        "exact",
        "child",
        "trailing-slash",
        "string-prefix",
        "shorter",
        "case",
        "root",
        "other-rule-path",
    ],
)
def test_rule_paths_are_segment_prefixes(path: str, allowed: bool) -> None:
    policy = Policy.from_config(POLICY_CONFIG)
    rule = policy.allowing_rule("spiffe://demo.local/ns/shop/sa/frontend", "GET", path)
    assert (rule is not None) is allowed


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/orders", "/orders"),
        ("/orders?x=/../admin", "/orders"),
        ("/orders#frag", "/orders"),
        ("/a%20b", "/a b"),
        ("/%61dmin", "/admin"),
        ("//admin", "/admin"),
        ("/public/../admin", None),
        ("/public/./x", None),
        ("/..", None),
        ("/%2e%2e/x", None),
        ("/%2E%2E/x", None),
        ("/.%2e/x", None),
        ("/a%2fb", None),
        ("/a%2Fb", None),
        ("/a%5cb", None),
        ("/a\\b", None),
        ("/a%00b", None),
        ("/a%ffb", None),
        ("orders", None),
        ("", None),
        ("*", None),
    ],
    ids=[
        "plain",
        "query-dropped",
        "fragment-dropped",
        "space-decoded",
        "letters-decoded",
        "double-slash-merged",
        "dot-dot",
        "dot",
        "bare-dot-dot",
        "encoded-dot-dot",
        "encoded-dot-dot-upper",
        "half-encoded-dot-dot",
        "encoded-slash",
        "encoded-slash-upper",
        "encoded-backslash",
        "backslash",
        "encoded-nul",
        "invalid-utf8",
        "relative",
        "empty",
        "asterisk",
    ],
)
def test_canonical_path(raw: str, canonical: str | None) -> None:
    assert canonical_path(raw) == canonical
    assert canonical_path(raw) == canonical  # the second answer comes from the memo


def test_canonical_path_memo_is_bounded() -> None:
    from sidecar.authz import policy as policy_module

    memo = policy_module._canonical_memo
    for i in range(memo.cache_info().maxsize + 10):  # type: ignore[operator]
        assert canonical_path(f"/p/{i}") == f"/p/{i}"
    assert memo.cache_info().currsize == memo.cache_info().maxsize
    long = "/" + "a" * policy_module._CANONICAL_KEY_MAX
    misses = memo.cache_info().misses
    assert canonical_path(long) == long
    assert memo.cache_info().misses == misses  # computed, never looked up nor kept


def _rule_name(policy: Policy, principal: str, method: str, path: str) -> str | None:
    rule = policy.allowing_rule(principal, method, path)
    return rule.name if rule is not None else None
