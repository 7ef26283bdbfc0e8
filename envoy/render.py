"""Render the committed Envoy configs in this folder from ``sidecar.envoy_config``.

    python envoy/render.py           # rewrite envoy/*.yaml
    python envoy/render.py --check   # exit 1 if a committed file differs from what renders

The YAML files are generated: edit ``sidecar/envoy_config.py`` (or the defaults below) and
re-run this script, never the YAML by hand. A test fails when they drift apart.

This folder is deliberately not a Python package: ``envoy`` is also the name of the protobuf
package from ``xds-protos``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(REPO_ROOT) not in sys.path:  # running as `python envoy/render.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from sidecar.envoy_config import dump_yaml, ingress_bootstrap  # noqa: E402

LISTEN_PORT = 10000
UPSTREAM_PORT = 8080
ADMIN_PORT = 9901
AUTHZ_GRPC_PORT = 9191
AUTHZ_HTTP_PORT = 9192
JWT_ISSUER = "http://127.0.0.1:8443"
JWT_AUDIENCES = ["spiffe://demo.local/ns/shop/sa/orders"]
JWT_JWKS_FILE = "/etc/sidecar/jwks.json"

_COMMON: dict[str, Any] = {
    "listen_port": LISTEN_PORT,
    "upstream_port": UPSTREAM_PORT,
    "admin_port": ADMIN_PORT,
}

# file name -> keyword arguments of ingress_bootstrap()
VARIANTS: dict[str, dict[str, Any]] = {
    "ingress-grpc.yaml": {**_COMMON, "mode": "grpc", "authz_port": AUTHZ_GRPC_PORT},
    "ingress-http.yaml": {**_COMMON, "mode": "http", "authz_port": AUTHZ_HTTP_PORT},
    "ingress-noauth.yaml": {**_COMMON, "mode": "none"},
    "ingress-jwt-authn.yaml": {
        **_COMMON,
        "mode": "jwt_authn",
        "jwt_issuer": JWT_ISSUER,
        "jwt_audiences": JWT_AUDIENCES,
        "jwt_jwks_file": JWT_JWKS_FILE,
    },
}


def _header(kwargs: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return (
        "# GENERATED FILE - DO NOT EDIT.\n"
        "# Rendered by envoy/render.py from sidecar/envoy_config.py:\n"
        f"#   ingress_bootstrap({args})\n"
        "# Regenerate with: python envoy/render.py\n"
    )


def render_all() -> dict[str, str]:
    """File name -> full YAML text (header included) of every committed config."""
    return {
        name: _header(kwargs) + dump_yaml(ingress_bootstrap(**kwargs))
        for name, kwargs in VARIANTS.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    parser.add_argument("--out-dir", type=Path, default=HERE, help="default: this folder")
    args = parser.parse_args(argv)
    stale: list[str] = []
    for name, text in render_all().items():
        path: Path = args.out_dir / name
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text)
            print(f"wrote {path}")
    if args.check and stale:
        print("stale: " + ", ".join(stale) + " (run: python envoy/render.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
