"""Policy patterns: the path glob language, and the load-time refusals and warnings that keep
a policy mistake from passing silently (issue 11.4)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from sidecar.authz.policy import Policy
from sidecar.errors import ConfigError

CALLER = "spiffe://demo.local/ns/shop/sa/frontend"


def _policy(paths: list[str], principals: list[str] | None = None, **rule: Any) -> Policy:
    return Policy.from_config(
        {"rules": [{"principals": principals or [CALLER], "paths": paths, **rule}]}
    )


def _allowed(pattern: str, path: str) -> bool:
    return _policy([pattern]).allowing_rule(CALLER, "GET", path) is not None


# -- the glob language of rules[].paths ------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "allowed"),
    [
        ("/orders/*", "/orders/42", True),
        ("/orders/*", "/orders/42/items", True),  # every pattern is a prefix
        ("/orders/*", "/orders", False),  # * is one non-empty segment
        ("/orders/*", "/orders/", False),
        ("/orders/*", "/ordersX/42", False),
        ("/orders/*/items", "/orders/42/items", True),
        ("/orders/*/items", "/orders/42/items/7", True),
        ("/orders/*/items", "/orders/42/itemsX", False),
        ("/orders/*/items", "/orders/4/2/items", False),
        ("/v*/orders", "/v2/orders", True),
        ("/v*/orders", "/v/orders", True),  # * inside a segment may be empty
        ("/v*/orders", "/x2/orders", False),
        ("/*.json", "/a.json", True),
        ("/*.json", "/a/b.json", False),
        ("/orders/**", "/orders", True),  # ** is zero or more segments
        ("/orders/**", "/orders/1/2", True),
        ("/orders/**", "/ordersX", False),
        ("/orders/**/edit", "/orders/edit", True),
        ("/orders/**/edit", "/orders/1/2/edit", True),
        ("/orders/**/edit", "/orders/1/2/editX", False),
        ("/**", "/", True),
        ("/*", "/", False),
        ("/*", "/a", True),
        ("/orders/*/", "/orders/1", False),  # a trailing "/" asks for one, as a literal does
        ("/orders/*/", "/orders/1/", True),
        ("/orders/*/", "/orders/1/x", True),
        ("/a.b/*", "/aXb/1", False),  # no regex syntax leaks through
        ("/(a|b)/*", "/a/1", False),
        ("/(a|b)/*", "/(a|b)/1", True),
    ],
)
def test_path_globs(pattern: str, path: str, allowed: bool) -> None:
    assert _allowed(pattern, path) is allowed


def test_literal_and_glob_paths_of_one_rule_both_count() -> None:
    policy = _policy(["/pay", "/orders/*/items"])
    assert policy.allowing_rule(CALLER, "GET", "/pay/now") is not None
    assert policy.allowing_rule(CALLER, "GET", "/orders/1/items") is not None
    assert policy.allowing_rule(CALLER, "GET", "/orders/1") is None


@pytest.mark.parametrize(
    ("pattern", "hint"),
    [
        ("/orders?id=1", "the query is not matched"),
        ("/orders#x", "the query is not matched"),
        ("/a%20b", "no '%' escapes"),
        ("/a\\b", "backslashes"),
        ("/a//b", "'//'"),
        ("/a/../b", "'..'"),
        ("/a/./b", "'.'"),
        ("/orders**", "** as a whole segment"),
        ("/**x/a", "** as a whole segment"),
        ("orders/*", "starting with '/'"),
    ],
)
def test_paths_no_request_can_match_are_refused(pattern: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        _policy([pattern])
    assert info.value.key == "authz.rules[0].paths"
    assert hint in str(info.value) and repr(pattern) in str(info.value)


def test_route_prefix_glob_is_refused_with_the_literal_form() -> None:
    with pytest.raises(ConfigError) as info:
        Policy.from_config({"routes": [{"prefix": "/orders/*", "auth": "bearer"}]})
    assert info.value.key == "authz.routes[0].prefix"
    assert "/orders already covers /orders/42" in str(info.value)


@pytest.mark.parametrize("field", ["principals", "paths", "methods"])
def test_empty_lists_in_a_rule_are_refused(field: str) -> None:
    rule = {"principals": [CALLER], "paths": ["/"], "methods": ["GET"], field: []}
    with pytest.raises(ConfigError) as info:
        Policy.from_config({"rules": [rule]})
    assert info.value.key == f"authz.rules[0].{field}"
    assert "matches nothing" in str(info.value)


# -- principals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        CALLER,
        "spiffe://demo.local/ns/*/sa/frontend",
        "spiffe://demo.local/ns/shop/**",
        "spiffe://demo.local/ns/shop/sa/front*",
        "spiffe://demo.local",
        "spiffe://*/ns/shop/sa/frontend",
        "spiffe://prod-*.example/ns/a",
        "wimse://example.com/specific-workload",
        "wimse://example.com/*",
        "**",
    ],
)
def test_valid_principal_patterns_load(pattern: str) -> None:
    _policy(["/"], [pattern])


@pytest.mark.parametrize(
    ("pattern", "hint"),
    [
        ("*", "** for any caller"),
        ("frontend", "SPIFFE or WIMSE IDs"),
        ("https://demo.local/x", "SPIFFE or WIMSE IDs"),
        ("spiffe://Demo.Local/ns/a", "lower-case"),
        ("spiffe://demo.local:8443/ns/a", "trust domain"),
        ("spiffe://user@demo.local/ns/a", "trust domain"),
        ("spiffe://demo.local/ns/a/", "trailing '/'"),
        ("spiffe://demo.local//a", "no empty"),
        ("spiffe://demo.local/ns/../a", "'..'"),
        ("spiffe://demo.local/ns/(a|b)", "letters, digits"),
        ("spiffe://demo.local/ns/[ab]/x", "letters, digits"),
        ("spiffe://demo.local/ns/shop**", "** as a whole segment"),
        ("spiffe://demo.local/" + "a" * 2048, "at most 2048 bytes"),
    ],
)
def test_principals_that_match_no_workload_id_are_refused(pattern: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        _policy(["/"], [CALLER, pattern])
    assert info.value.key == "authz.rules[0].principals"
    assert hint in str(info.value)


@pytest.mark.parametrize(
    ("pattern", "principal", "matches"),
    [
        ("spiffe://*/ns/a", "spiffe://one.example/ns/a", True),
        ("spiffe://*/ns/a", "spiffe://one.example/ns/b", False),
        ("spiffe://**", "spiffe://one.example/ns/a/b", True),
        ("spiffe://**", "wimse://one.example/ns/a", False),
        ("spiffe://demo.local/ns/**", "spiffe://demo.local/nsX/a", False),
        ("**", "wimse://example.com/w", True),
    ],
)
def test_principal_wildcards(pattern: str, principal: str, matches: bool) -> None:
    policy = _policy(["/"], [pattern])
    assert (policy.allowing_rule(principal, "GET", "/") is not None) is matches


# -- warnings at load ------------------------------------------------------------------------


def _warnings(caplog: pytest.LogCaptureFixture, config: Any) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sidecar.authz.policy"):
        Policy.from_config(config)
    return [r.getMessage() for r in caplog.records if r.name == "sidecar.authz.policy"]


def test_no_rules_warns_that_everything_is_denied(caplog: pytest.LogCaptureFixture) -> None:
    configs: list[dict[str, Any]] = [{}, {"rules": []}, {"routes": [{"prefix": "/a"}]}]
    for config in configs:
        (line,) = _warnings(caplog, config)
        assert "authz.rules is empty" in line and "denied 403 policy_denied" in line


def _rule(name: str, principals: list[str], paths: list[str], methods: Any = None) -> Any:
    rule = {"name": name, "principals": principals, "paths": paths}
    return rule if methods is None else {**rule, "methods": methods}


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        (_rule("all", ["**"], ["/"]), _rule("orders", [CALLER], ["/orders"], ["GET"])),
        (
            _rule("shop", ["spiffe://demo.local/ns/shop/**"], ["/orders"]),
            _rule("frontend", [CALLER], ["/orders/*/items"], ["GET", "POST"]),
        ),
        (
            _rule("reads", ["spiffe://demo.local/ns/*/sa/frontend"], ["/orders/*"], ["GET"]),
            _rule("one", [CALLER], ["/orders/42"], ["GET"]),
        ),
        (
            _rule("root-dir", [CALLER], ["/orders/"]),
            _rule("below", [CALLER], ["/orders/a/b"]),
        ),
    ],
    ids=["any-caller-root", "wider-principal-and-prefix", "glob-covers-literal", "slash-prefix"],
)
def test_a_shadowed_rule_is_warned_about(
    caplog: pytest.LogCaptureFixture, earlier: Any, later: Any
) -> None:
    (line,) = _warnings(caplog, {"rules": [earlier, later]})
    assert f"authz.rules[1] ({later['name']}) is shadowed by authz.rules[0]" in line
    # Swapped, the narrower rule first: nothing is shadowed.
    assert _warnings(caplog, {"rules": [later, earlier]}) == []


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        (_rule("get", [CALLER], ["/"], ["GET"]), _rule("post", [CALLER], ["/"], ["GET", "POST"])),
        (_rule("a", [CALLER], ["/orders"]), _rule("b", [CALLER], ["/ordersX"])),
        (_rule("a", [CALLER], ["/orders/"]), _rule("b", [CALLER], ["/orders"])),
        (_rule("a", [CALLER], ["/orders/*"]), _rule("b", [CALLER], ["/orders/**"])),
        (
            _rule("a", ["spiffe://demo.local/ns/*/sa/frontend"], ["/"]),
            _rule("b", ["spiffe://demo.local/ns/**"], ["/"]),
        ),
        (_rule("a", [CALLER], ["/"]), _rule("b", ["spiffe://demo.local/ns/shop/sa/x"], ["/"])),
    ],
    ids=["more-methods", "sibling-path", "slash-vs-bare", "star-vs-starstar", "star-vs-wide", "id"],
)
def test_rules_that_still_decide_something_are_not_warned_about(
    caplog: pytest.LogCaptureFixture, earlier: Any, later: Any
) -> None:
    assert _warnings(caplog, {"rules": [earlier, later]}) == []
