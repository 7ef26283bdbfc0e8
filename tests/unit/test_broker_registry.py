"""Registration entries and selector matching (sidecar.broker.registry): pure, no I/O."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.broker.registry import (
    Registry,
    audience_pattern,
    k8s_selectors,
    normalize_selector,
    parse_entries,
    unix_selectors,
    validate_spiffe_id,
)
from sidecar.errors import ConfigError

HEX = "AB" * 32


def entry(
    spiffe_id: str, selectors: list[str], audiences: Any = ("**",), **kw: Any
) -> dict[str, Any]:
    return {"spiffe_id": spiffe_id, "selectors": selectors, "audiences": list(audiences), **kw}


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("unix:uid:1000", "unix:uid:1000"),
        ("unix:uid:007", "unix:uid:7"),
        ("unix:gid:0", "unix:gid:0"),
        ("unix:path:/usr/bin/python3.11", "unix:path:/usr/bin/python3.11"),
        (f"unix:sha256:{HEX}", f"unix:sha256:{HEX.lower()}"),
        ("k8s:ns:shop", "k8s:ns:shop"),
        ("k8s:sa:frontend.v2", "k8s:sa:frontend.v2"),
        (
            "k8s:cluster:https://kubernetes.default.svc",
            "k8s:cluster:https://kubernetes.default.svc",
        ),
    ],
)
def test_selectors_are_normalized(raw: str, canonical: str) -> None:
    assert normalize_selector(raw, "k") == canonical


@pytest.mark.parametrize(
    "raw",
    [
        "uid:1000",
        "unix:uid:",
        "unix:uid:-1",
        "unix:uid:abc",
        "unix:pid:12",
        "unix:path:relative/bin",
        "unix:path:/usr/../bin/sh",
        "unix:path:/usr//bin/sh",
        "unix:sha256:abc",
        "k8s:ns:Shop",
        "k8s:ns:-x",
        "k8s:pod:x",
        "spiffe:id:x",
    ],
)
def test_bad_selectors_name_the_key(raw: str) -> None:
    with pytest.raises(ConfigError) as err:
        normalize_selector(raw, "entries[3].selectors[1]")
    assert err.value.key == "entries[3].selectors[1]"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("spiffe://demo.local/ns/shop/sa/frontend", True),
        ("spiffe://demo.local", True),
        ("spiffe://Demo.local/x", False),
        ("spiffe://demo.local/", False),
        ("spiffe://demo.local//x", False),
        ("spiffe://demo.local/../x", False),
        ("spiffe://demo.local/a?b", False),
        ("https://demo.local/x", False),
        ("spiffe:///x", False),
    ],
)
def test_spiffe_id_validation(value: str, ok: bool) -> None:
    assert (validate_spiffe_id(value) is None) is ok


def test_most_specific_entry_wins_then_file_order() -> None:
    reg = parse_entries(
        [
            entry("spiffe://t/any-python", ["unix:uid:1000", "unix:path:/usr/bin/python3"]),
            entry("spiffe://t/uid", ["unix:uid:1000"]),
            entry(
                "spiffe://t/pinned",
                ["unix:uid:1000", "unix:path:/usr/bin/python3", f"unix:sha256:{HEX}"],
            ),
            entry("spiffe://t/gid", ["unix:gid:50"]),
        ]
    )
    caller = unix_selectors(uid=1000, gid=50, path="/usr/bin/python3", sha256=HEX.lower())
    found = reg.match(caller)
    assert found is not None and found.spiffe_id == "spiffe://t/pinned"
    other_hash = unix_selectors(uid=1000, gid=50, path="/usr/bin/python3", sha256="00" * 32)
    found = reg.match(other_hash)
    assert found is not None and found.spiffe_id == "spiffe://t/any-python"
    # uid and gid entries both have one selector: the first in the file wins.
    found = reg.match(unix_selectors(uid=1000, gid=50, path="/bin/sh", sha256=None))
    assert found is not None and found.spiffe_id == "spiffe://t/uid"
    assert reg.match(unix_selectors(uid=1, gid=2, path=None, sha256=None)) is None
    assert reg.needs_sha256


def test_all_selectors_must_match() -> None:
    reg = parse_entries([entry("spiffe://t/x", ["k8s:ns:shop", "k8s:sa:frontend"])])
    assert reg.match(k8s_selectors(namespace="shop", service_account="frontend", cluster="c"))
    assert (
        reg.match(k8s_selectors(namespace="shop", service_account="backend", cluster="c")) is None
    )
    assert (
        reg.match(k8s_selectors(namespace="bank", service_account="frontend", cluster="c")) is None
    )
    assert not reg.needs_sha256


@pytest.mark.parametrize(
    ("pattern", "audience", "ok"),
    [
        ("spiffe://t/ns/shop/sa/*", "spiffe://t/ns/shop/sa/orders", True),
        ("spiffe://t/ns/shop/sa/*", "spiffe://t/ns/shop/sa/orders/x", False),
        ("spiffe://t/ns/shop/**", "spiffe://t/ns/shop/sa/orders", True),
        ("spiffe://t/ns/shop/sa/orders", "spiffe://t/ns/shop/sa/orders", True),
        ("spiffe://t/ns/shop/sa/orders", "spiffe://t/ns/shop/sa/ordersX", False),
        ("**", "https://api.example.com/v1", True),
        ("https://*.example.com", "https://api.example.com", True),
        ("a.b", "axb", False),  # dots are literal
        ("a+b", "a+b", True),
    ],
)
def test_audience_globs(pattern: str, audience: str, ok: bool) -> None:
    assert bool(audience_pattern(pattern).match(audience)) is ok


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"spiffe_id": "spiffe://t/x", "selectors": ["unix:uid:1"]}, "entries[0].audiences"),
        ({"selectors": ["unix:uid:1"], "audiences": ["a"]}, "entries[0].spiffe_id"),
        (entry("http://t/x", ["unix:uid:1"]), "entries[0].spiffe_id"),
        (entry("spiffe://t/x", []), "entries[0].selectors"),
        (entry("spiffe://t/x", ["unix:uid:1", "k8s:ns:a"]), "entries[0].selectors"),
        (entry("spiffe://t/x", [f"unix:sha256:{HEX}"]), "entries[0].selectors"),
        (entry("spiffe://t/x", ["k8s:sa:a"]), "entries[0].selectors"),
        (entry("spiffe://t/x", ["unix:uid:1"], audiences=[]), "entries[0].audiences"),
        (entry("spiffe://t/x", ["unix:uid:1"], ttl=0), "entries[0].ttl"),
        (entry("spiffe://t/x", ["unix:uid:1"], ttl=10**6), "entries[0].ttl"),
        (entry("spiffe://t/x", ["unix:uid:1"], colour="red"), "entries[0].colour"),
        ("not a mapping", "entries[0]"),
    ],
)
def test_entry_errors_name_the_key(raw: Any, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_entries([raw])
    assert err.value.key == key


def test_the_same_selector_set_twice_is_ambiguous() -> None:
    with pytest.raises(ConfigError) as err:
        parse_entries(
            [
                entry("spiffe://t/a", ["unix:uid:1", "unix:gid:2"]),
                entry("spiffe://t/b", ["unix:gid:2", "unix:uid:01"]),
            ]
        )
    assert err.value.key == "entries[1].selectors"


def test_entry_ttl_and_max_ttl() -> None:
    reg = parse_entries(
        [entry("spiffe://t/a", ["unix:uid:1"], ttl=900), entry("spiffe://t/b", ["unix:uid:2"])]
    )
    assert reg.entries[0].ttl == 900 and reg.entries[1].ttl is None
    assert reg.max_ttl(300) == 900
    assert Registry([]).max_ttl(300) == 300
    assert reg.entries[0].attestor == "unix"
