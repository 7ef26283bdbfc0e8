"""The Envoy configs: committed files match the renderer, and real Envoy accepts all of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pytest

from sidecar.envoy_config import (
    AUTHZ_GRPC_CLUSTER,
    AUTHZ_HTTP_CLUSTER,
    IngressMode,
    dump_yaml,
    ingress_bootstrap,
)
from sidecar.net_limits import GRPC_LIMITS, HTTP_LIMITS
from tests.integration.harness import REPO_ROOT, envoy_render, free_port, validate_envoy_config

ENVOY_DIR = REPO_ROOT / "envoy"
EXPECTED_FILES = {
    "ingress-grpc.yaml",
    "ingress-http.yaml",
    "ingress-noauth.yaml",
    "ingress-jwt-authn.yaml",
}
MODES: tuple[str, ...] = get_args(IngressMode)


RENDER = envoy_render()


def _assert_valid(path: Path) -> None:
    result = validate_envoy_config(path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"envoy --mode validate {path.name} failed:\n{output}"
    assert "OK" in output, output
    assert "deprecated" not in output.lower(), f"{path.name} uses deprecated fields:\n{output}"


# -- committed files -------------------------------------------------------------------------


def test_committed_files_are_exactly_what_render_py_renders() -> None:
    rendered: dict[str, str] = RENDER.render_all()
    assert set(rendered) == EXPECTED_FILES
    committed = {p.name: p.read_text() for p in ENVOY_DIR.glob("*.yaml")}
    assert set(committed) == EXPECTED_FILES
    stale = sorted(name for name in rendered if rendered[name] != committed[name])
    assert not stale, f"stale {stale}: run `python envoy/render.py`"


def test_committed_files_say_they_are_generated() -> None:
    for name in EXPECTED_FILES:
        head = (ENVOY_DIR / name).read_text().splitlines()[:3]
        assert head[0].startswith("# GENERATED FILE"), name
        assert any("envoy/render.py" in line for line in head), name
        assert head[1].startswith("# Rendered by: sidecar envoy-config --mode "), name


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_committed_config_passes_envoy_validate(name: str, tmp_path: Path, jwks_file: Path) -> None:
    text = (ENVOY_DIR / name).read_text()
    if RENDER.JWT_JWKS_FILE in text:
        # Envoy reads local_jwks at validation and needs a real key there: validate a copy that
        # points at a temporary JWKS instead of /etc/sidecar/jwks.json.
        text = text.replace(RENDER.JWT_JWKS_FILE, str(jwks_file))
    copy = tmp_path / name
    copy.write_text(text)
    _assert_valid(copy)


# -- every mode, random ports ----------------------------------------------------------------


def _random_config(mode: str, jwks_file: Path) -> dict[str, Any]:
    return ingress_bootstrap(
        listen_port=free_port(),
        upstream_port=free_port(),
        admin_port=free_port(),
        mode=mode,  # type: ignore[arg-type]
        authz_port=free_port() if mode in ("grpc", "http") else None,
        jwt_issuer="https://issuer.example" if mode == "jwt_authn" else None,
        jwt_audiences=["spiffe://demo.local/ns/shop/sa/orders"] if mode == "jwt_authn" else None,
        jwt_jwks_file=str(jwks_file) if mode == "jwt_authn" else None,
        authz_timeout_ms=1500,
    )


@pytest.mark.integration
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_with_random_ports_passes_envoy_validate(
    mode: str, tmp_path: Path, jwks_file: Path
) -> None:
    path = tmp_path / f"{mode}.yaml"
    path.write_text(dump_yaml(_random_config(mode, jwks_file)))
    _assert_valid(path)


@pytest.mark.integration
def test_authz_host_name_gives_a_dns_cluster_that_validates(tmp_path: Path) -> None:
    cfg = ingress_bootstrap(
        listen_port=10000,
        upstream_port=8080,
        admin_port=9901,
        mode="grpc",
        authz_port=9191,
        authz_host="localhost",
        upstream_host="localhost",
    )
    types = {c["name"]: c["type"] for c in cfg["static_resources"]["clusters"]}
    assert types == {"app": "STRICT_DNS", AUTHZ_GRPC_CLUSTER: "STRICT_DNS"}
    path = tmp_path / "dns.yaml"
    path.write_text(dump_yaml(cfg))
    _assert_valid(path)


# -- structure (no Envoy needed) -------------------------------------------------------------


def _hcm(cfg: dict[str, Any]) -> dict[str, Any]:
    listener = cfg["static_resources"]["listeners"][0]
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _filters(cfg: dict[str, Any]) -> list[str]:
    return [f["name"] for f in _hcm(cfg)["http_filters"]]


def _clusters(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in cfg["static_resources"]["clusters"]}


def _base(**kw: Any) -> dict[str, Any]:
    return ingress_bootstrap(listen_port=10000, upstream_port=8080, admin_port=9901, **kw)


def test_common_shape() -> None:
    for mode in ("none", "grpc", "http"):
        cfg = _base(mode=mode, authz_port=9191)
        hcm = _hcm(cfg)
        assert hcm["use_remote_address"] is True
        # No trusted hops: Envoy overwrites x-forwarded-proto, the authorizer's scheme source.
        assert hcm["xff_num_trusted_hops"] == 0
        assert _filters(cfg)[-1] == "envoy.filters.http.router"
        route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
        assert route == {"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "30s"}}
        fmt = hcm["access_log"][0]["typed_config"]["log_format"]["text_format_source"]
        assert "%RESPONSE_CODE%" in fmt["inline_string"]
        assert "%DYNAMIC_METADATA(envoy.filters.http.ext_authz)%" in fmt["inline_string"]
        assert cfg["admin"]["address"]["socket_address"] == {
            "address": "127.0.0.1",
            "port_value": 9901,
        }
    assert _filters(_base(mode="none")) == ["envoy.filters.http.router"]


def test_grpc_mode() -> None:
    cfg = _base(mode="grpc", authz_port=9191, authz_timeout_ms=250)
    assert _filters(cfg) == ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]
    authz = _hcm(cfg)["http_filters"][0]["typed_config"]
    assert authz["grpc_service"] == {
        "envoy_grpc": {"cluster_name": AUTHZ_GRPC_CLUSTER},
        "timeout": "0.250s",
    }
    assert authz["transport_api_version"] == "V3"
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    assert authz["include_peer_certificate"] is False
    assert "with_request_body" not in authz
    assert "allowed_headers" not in authz  # gRPC must see every client header
    cluster = _clusters(cfg)[AUTHZ_GRPC_CLUSTER]
    opts = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert opts["explicit_http_config"] == {"http2_protocol_options": {}}
    # As for HTTP: Envoy drops an idle connection before the authorizer's loop engine does.
    idle = float(opts["common_http_protocol_options"]["idle_timeout"].rstrip("s"))
    assert idle < GRPC_LIMITS.idle_timeout
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"] == {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 9191}}
    }


def test_http_mode() -> None:
    cfg = _base(mode="http", authz_port=9192, authz_host="127.0.0.1")
    authz = _hcm(cfg)["http_filters"][0]["typed_config"]
    svc = authz["http_service"]
    assert svc["server_uri"] == {
        "uri": "http://127.0.0.1:9192",
        "cluster": AUTHZ_HTTP_CLUSTER,
        "timeout": "0.250s",
    }
    allowed = authz["allowed_headers"]["patterns"]
    for pattern in (
        {"exact": "authorization"},
        {"exact": "dpop"},
        {"exact": "host"},
        {"exact": "x-forwarded-proto"},
        {"prefix": "x-workload-"},
    ):
        assert pattern in allowed
    resp = svc["authorization_response"]
    assert resp["allowed_upstream_headers"]["patterns"] == [{"prefix": "x-workload-"}]
    client = resp["allowed_client_headers"]["patterns"]
    for name in ("www-authenticate", "dpop-nonce", "x-authz-reason", "content-type"):
        assert {"exact": name} in client
    assert resp["allowed_client_headers_on_success"]["patterns"] == [{"exact": "dpop-nonce"}]
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    assert AUTHZ_HTTP_CLUSTER in _clusters(cfg)
    [options] = _clusters(cfg)[AUTHZ_HTTP_CLUSTER]["typed_extension_protocol_options"].values()
    assert "http_protocol_options" in options["explicit_http_config"]  # HTTP/1.1, as before
    # Envoy drops an idle connection before the authorizer does (no check sent on a connection
    # being closed): its idle limit is below the authorizer's default.
    idle = float(options["common_http_protocol_options"]["idle_timeout"].rstrip("s"))
    assert idle < HTTP_LIMITS.idle_timeout


def test_jwt_authn_mode() -> None:
    cfg = _base(
        mode="jwt_authn",
        jwt_issuer="http://127.0.0.1:8443",
        jwt_audiences=["aud-a", "aud-b"],
        jwt_jwks_file="/etc/sidecar/jwks.json",
    )
    assert _filters(cfg) == ["envoy.filters.http.jwt_authn", "envoy.filters.http.router"]
    jwt = _hcm(cfg)["http_filters"][0]["typed_config"]
    (name, provider), *_ = jwt["providers"].items()
    assert provider == {
        "issuer": "http://127.0.0.1:8443",
        "audiences": ["aud-a", "aud-b"],
        "local_jwks": {"filename": "/etc/sidecar/jwks.json"},
        "forward": False,
    }
    assert jwt["rules"] == [{"match": {"prefix": "/"}, "requires": {"provider_name": name}}]
    assert set(_clusters(cfg)) == {"app"}


def test_missing_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="authz_port"):
        _base(mode="grpc")
    with pytest.raises(ValueError, match="authz_port"):
        _base(mode="http")
    with pytest.raises(ValueError, match="jwt"):
        _base(mode="jwt_authn", jwt_issuer="x")
    with pytest.raises(ValueError, match="mode"):
        _base(mode="basic")
    with pytest.raises(ValueError, match="timeout"):
        _base(mode="grpc", authz_port=1, authz_timeout_ms=0)


def test_returned_configs_do_not_share_state() -> None:
    a = _base(mode="http", authz_port=9192)
    _hcm(a)["http_filters"][0]["typed_config"]["allowed_headers"]["patterns"].clear()
    b = _base(mode="http", authz_port=9192)
    assert _hcm(b)["http_filters"][0]["typed_config"]["allowed_headers"]["patterns"]
    assert "&" not in dump_yaml(b) and "*id" not in dump_yaml(b)  # no YAML anchors
