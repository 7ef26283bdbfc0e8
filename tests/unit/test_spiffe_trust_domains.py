"""JWT-SVIDs on ingress: keys chosen by the trust domain of ``sub`` and by bundle ``use``,
the JWT-SVID profile checks, and ``trust_domain_mismatch``."""

from __future__ import annotations

from typing import Any

import pytest
from factory import CHECKOUT, FRONTEND, NOW, ed_key, header, make_harness, run
from spiffe_factory import (
    DOMAIN,
    DOMAIN_KID,
    OTHER_DOMAIN,
    OTHER_KEY,
    OTHER_KID,
    bundle,
    spiffe_harness,
    svid,
)

from sidecar.authz.config import parse_authz_config
from sidecar.authz.decision import Allow, Deny
from sidecar.authz.trust_domains import TrustBundles, make_bundle_source
from sidecar.errors import ConfigError, Reason
from sidecar.jose.spiffe_bundle import import_bundle
from sidecar.jose.spiffe_id import trust_domain_of
from sidecar.jose.wimse_wit import WitKeys


def bearer(h: Any, token: str, path: str = "/public/info") -> Any:
    return h.decide(h.bearer_request(token=token, path=path))


def denied(decision: Any, reason: Reason) -> None:
    assert isinstance(decision, Deny), decision
    assert decision.reason is reason, decision.detail


@pytest.mark.parametrize("typ", [None, "JWT", "JOSE", "jwt"])
def test_svid_without_iss_is_allowed_on_a_bearer_route(typ: str | None) -> None:
    h = spiffe_harness()
    decision = bearer(h, svid(typ=typ))
    assert isinstance(decision, Allow), getattr(decision, "detail", "")
    assert header(decision, "x-workload-id") == FRONTEND
    assert header(decision, "x-workload-issuer") == f"spiffe://{DOMAIN}"
    assert header(decision, "x-workload-auth") == "bearer"


def test_svid_with_untrusted_iss_is_still_judged_by_its_trust_domain() -> None:
    decision = bearer(spiffe_harness(), svid(iss="https://oidc.demo.local"))
    assert isinstance(decision, Allow)
    assert header(decision, "x-workload-issuer") == "https://oidc.demo.local"


def test_access_tokens_of_issuers_still_verify_beside_trust_domains() -> None:
    h = spiffe_harness()
    assert isinstance(h.decide(h.dpop_request(token=h.token())), Allow)


def test_svid_is_refused_on_a_dpop_route() -> None:
    h = spiffe_harness()
    denied(bearer(h, svid(), path="/orders"), Reason.BEARER_NOT_ALLOWED)


def test_other_domain_sub_signed_by_this_domains_key_is_a_trust_domain_mismatch() -> None:
    forged = svid(sub=f"spiffe://{OTHER_DOMAIN}/ns/shop/sa/frontend")
    # The named domain unknown, or trusted with its own keys: either way, the mismatch.
    denied(bearer(spiffe_harness(), forged), Reason.TRUST_DOMAIN_MISMATCH)
    denied(bearer(spiffe_harness(with_other=True), forged), Reason.TRUST_DOMAIN_MISMATCH)
    # Signed by the other domain's key but naming ours: same reason.
    reverse = svid(key=OTHER_KEY, kid=OTHER_KID)
    denied(bearer(spiffe_harness(with_other=True), reverse), Reason.TRUST_DOMAIN_MISMATCH)


def test_unknown_domain_without_a_matching_key_is_untrusted() -> None:
    token = svid(sub="spiffe://nowhere.example/x", key=ed_key(3), alg="EdDSA")
    denied(bearer(spiffe_harness(), token), Reason.UNTRUSTED_ISSUER)


@pytest.mark.parametrize("use", ["wit-svid", "x509-svid", "sig", None])
def test_keys_not_published_for_jwt_svids_never_verify_them(use: str | None) -> None:
    h = make_harness(trust_domains={DOMAIN: frozenset({"ES256"})})
    h.authz.bundles.replace(DOMAIN, import_bundle(bundle(use=use)))
    decision = bearer(h, svid())
    denied(decision, Reason.UNKNOWN_KEY)
    # The refresh asked for is of the trust domain's bundle, not of an issuer.
    assert decision.metadata["iss"] == f"spiffe://{DOMAIN}"


def test_wit_svid_keys_are_kept_apart_for_the_wit_verifier() -> None:
    bundles = TrustBundles()
    bundles.replace(DOMAIN, import_bundle(bundle(use="wit-svid")))
    assert [k.kid for k in bundles.keys_for_use("wit-svid", DOMAIN, None)] == [DOMAIN_KID]
    assert not bundles.keys_for_use("jwt-svid", DOMAIN, None)
    wit_keys: WitKeys = bundles  # the WIT verifier reads the same store
    assert [k.kid for k in wit_keys.wit_keys(DOMAIN, DOMAIN_KID)] == [DOMAIN_KID]


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"typ": "at+jwt"}, Reason.WRONG_TYPE),
        ({"typ": "wit+jwt"}, Reason.WRONG_TYPE),
        ({"drop": ("aud",)}, Reason.MALFORMED_TOKEN),
        ({"drop": ("exp",)}, Reason.MALFORMED_TOKEN),
        ({"aud": "spiffe://demo.local/someone-else"}, Reason.WRONG_AUDIENCE),
        ({"exp": int(NOW - 60)}, Reason.EXPIRED),
        ({"key": ed_key(8), "alg": "EdDSA"}, Reason.ALG_NOT_ALLOWED),
        ({"kid": "rotated-away"}, Reason.UNKNOWN_KEY),
        ({"key": OTHER_KEY, "kid": None}, Reason.BAD_SIGNATURE),
    ],
)
def test_jwt_svid_profile(kw: dict[str, Any], reason: Reason) -> None:
    denied(bearer(spiffe_harness(), svid(**kw)), reason)


@pytest.mark.parametrize(
    "sub",
    [
        "spiffe://Demo.local/x",  # upper case trust domain
        "spiffe://demo.local:8443/x",  # port
        "spiffe://user@demo.local/x",  # userinfo
        "spiffe://demo.local/x?y=1",  # query
        "spiffe://demo.local/x#frag",  # fragment
        "spiffe://demo.local//x",  # empty segment
        "spiffe://demo.local/./x",  # dot segment
        "spiffe://demo.local/x/..",  # dot-dot segment
        "spiffe://demo.local/x/",  # trailing slash
        "spiffe:///x",  # no trust domain
        "spiffe://demo.local/" + "a" * 2100,  # too long
    ],
)
def test_sub_must_be_a_valid_spiffe_id(sub: str) -> None:
    assert trust_domain_of(sub) is None
    denied(bearer(spiffe_harness(), svid(sub=sub)), Reason.MALFORMED_TOKEN)


def test_valid_spiffe_ids() -> None:
    assert trust_domain_of("spiffe://demo.local") == "demo.local"
    assert trust_domain_of(CHECKOUT) == "demo.local"
    assert trust_domain_of("spiffe://a_b-c.d/A.b-c_9/x") == "a_b-c.d"


def test_a_rotated_bundle_drops_cached_svids() -> None:
    h = spiffe_harness()
    token = svid()
    assert isinstance(bearer(h, token), Allow)
    h.authz.bundles.replace(DOMAIN, import_bundle(bundle(OTHER_KEY, "next")))
    denied(bearer(h, token), Reason.UNKNOWN_KEY)


def test_without_trust_domains_an_svid_is_refused_as_before() -> None:
    denied(bearer(make_harness(), svid()), Reason.MALFORMED_TOKEN)


def test_import_bundle_keeps_only_jwt_uses() -> None:
    doc = bundle()
    doc["keys"].append({**bundle(OTHER_KEY, "w")["keys"][0], "use": "wit-svid"})
    doc["keys"].append({"kty": "EC", "use": "x509-svid", "x5c": ["AAAA"]})
    doc["keys"].append(
        {k: v for k, v in bundle(ed_key(4), "nouse")["keys"][0].items() if k != "use"}
    )
    keys = import_bundle(doc)
    assert [(k.kid, k.use) for k in keys] == [(DOMAIN_KID, "jwt-svid"), ("w", "wit-svid")]


# -- configuration ---------------------------------------------------------------------------


def config(**td: Any) -> dict[str, Any]:
    return {"audience": "a", "trust_domains": [{"name": DOMAIN, **td}]}


def test_config_trust_domain_from_a_file_needs_no_issuer() -> None:
    cfg = parse_authz_config(config(bundle_file="/etc/spiffe/bundle.json"))
    assert not cfg.settings.issuers
    assert cfg.settings.trust_domains == {DOMAIN: cfg.trust_domains[0].algorithms}
    assert "EdDSA" not in cfg.trust_domains[0].algorithms
    assert cfg.trust_domains[0].location.file == "/etc/spiffe/bundle.json"


def test_config_workload_api_socket() -> None:
    cfg = parse_authz_config(config(workload_api=True, socket="unix:///run/spire/agent.sock"))
    assert cfg.trust_domains[0].workload_api
    assert cfg.trust_domains[0].socket == "unix:///run/spire/agent.sock"


@pytest.mark.parametrize(
    ("td", "key"),
    [
        ({"bundle_endpoint": "http://bundle.demo.local/"}, "trust_domains[0].bundle_endpoint"),
        ({"bundle_file": "/b", "workload_api": True}, "trust_domains[0]"),
        ({}, "trust_domains[0]"),
        ({"name": "Demo.Local", "bundle_file": "/b"}, "trust_domains[0].name"),
        ({"bundle_file": "/b", "socket": "unix:///s"}, "trust_domains[0].socket"),
        ({"workload_api": True, "socket": "/run/s"}, "trust_domains[0].socket"),
        ({"bundle_file": "/b", "algorithms": ["HS256"]}, "trust_domains[0].algorithms"),
    ],
)
def test_config_errors_name_the_key(td: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_authz_config(config(**td))
    assert err.value.key == f"authz.{key}"


def test_config_http_endpoint_only_with_the_test_flag() -> None:
    cfg = parse_authz_config(config(bundle_endpoint="http://127.0.0.1:1/b", insecure_http=True))
    assert cfg.trust_domains[0].location.uri == "http://127.0.0.1:1/b"


def test_config_duplicate_trust_domain() -> None:
    raw = config(bundle_file="/a")
    raw["trust_domains"].append({"name": DOMAIN, "bundle_file": "/b"})
    with pytest.raises(ConfigError, match="unique"):
        parse_authz_config(raw)


def test_config_issuers_still_required_without_trust_domains() -> None:
    with pytest.raises(ConfigError, match="issuers"):
        parse_authz_config({"audience": "a"})


def test_bundle_file_source_fills_the_trust_bundles(tmp_path: Any) -> None:
    import json

    from sidecar.authz.config import parse_authz_config as parse

    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle()))
    cfg = parse(config(bundle_file=str(path)))
    bundles = TrustBundles()
    source, api = make_bundle_source(cfg.trust_domains[0], bundles)
    assert api is None
    assert run(source.refresh())
    assert [k.kid for k in bundles.keys_for_use("jwt-svid", DOMAIN, None)] == [DOMAIN_KID]


def test_bundle_endpoint_source_fetches_and_refreshes_over_http() -> None:
    """A real local HTTP server (``insecure_http``, the test-only flag) serving the bundle,
    rotated between two refreshes."""
    from aiohttp import web

    served = {"doc": bundle()}

    async def handler(_: web.Request) -> web.Response:
        return web.json_response(served["doc"])

    async def main() -> tuple[list[str | None], list[str | None]]:
        app = web.Application()
        app.router.add_get("/bundle", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            url = f"http://127.0.0.1:{port}/bundle"
            cfg = parse_authz_config(config(bundle_endpoint=url, insecure_http=True))
            bundles = TrustBundles()
            source, _ = make_bundle_source(cfg.trust_domains[0], bundles)
            assert await source.refresh()
            first = [k.kid for k in bundles.keys_for_use("jwt-svid", DOMAIN, None)]
            served["doc"] = bundle(OTHER_KEY, "rotated")
            assert await source.refresh()
            second = [k.kid for k in bundles.keys_for_use("jwt-svid", DOMAIN, None)]
            return first, second
        finally:
            await runner.cleanup()

    first, second = run(main())
    assert first == [DOMAIN_KID] and second == ["rotated"]


@pytest.mark.parametrize(
    ("hint", "interval"),
    [
        (60, 60.0),  # the publisher's hint, sooner than refresh_interval: taken
        (3, 10.0),  # never below min_refresh_interval
        (3600, 300.0),  # never later than refresh_interval
        (None, 300.0),
        (True, 300.0),  # not an integer: ignored
        (-5, 300.0),
        ("60", 300.0),
    ],
)
def test_spiffe_refresh_hint_schedules_the_periodic_refresh(
    hint: object, interval: float, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPIFFE Trust Domain and Bundle §4.1.2: the bundle's ``spiffe_refresh_hint`` says how
    often to check for a new one (the broker publishes its ``keys.jwks_max_age``)."""
    import asyncio
    import json

    doc = {k: v for k, v in bundle().items() if k != "spiffe_refresh_hint"}
    if hint is not None:
        doc["spiffe_refresh_hint"] = hint
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(doc))
    cfg = parse_authz_config(
        config(bundle_file=str(path), refresh_interval=300, min_refresh_interval=10)
    )
    source, _ = make_bundle_source(cfg.trust_domains[0], TrustBundles())
    delays: list[float] = []

    async def fake_sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) >= 3:
            raise asyncio.CancelledError

    async def main() -> None:
        assert await source.refresh("startup")
        monkeypatch.setattr(asyncio, "sleep", fake_sleep)  # the module jwks sleeps through
        await source.run_periodic()

    with pytest.raises(asyncio.CancelledError):
        run(main())
    assert delays == [interval] * 3
    assert source.interval == interval
