"""Render the committed Envoy configs in this folder with ``sidecar envoy-config``.

    python envoy/render.py           # rewrite envoy/*.yaml
    python envoy/render.py --check   # exit 1 if a committed file differs from what renders

Each file is exactly what ``sidecar envoy-config ARGS`` prints for the ARGS in ``VARIANTS``
(same code path: :func:`sidecar.envoy_command.render_args`), built from the typed classes in
``sidecar/envoy_config.py``. The YAML files are generated: edit that module (or the command's
defaults) and re-run this script, never the YAML by hand. A test fails when they drift apart.

This folder is deliberately not a Python package: ``envoy`` is also the name of the protobuf
package from ``xds-protos``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(REPO_ROOT) not in sys.path:  # running as `python envoy/render.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from sidecar import envoy_command  # noqa: E402

# The command's defaults are the committed files' values.
LISTEN_PORT = envoy_command.DEFAULT_LISTEN_PORT
UPSTREAM_PORT = envoy_command.DEFAULT_UPSTREAM_PORT
ADMIN_PORT = envoy_command.DEFAULT_ADMIN_PORT
AUTHZ_GRPC_PORT = envoy_command.DEFAULT_AUTHZ_PORTS["grpc"]
AUTHZ_HTTP_PORT = envoy_command.DEFAULT_AUTHZ_PORTS["http"]
JWT_ISSUER = "http://127.0.0.1:8443"
JWT_AUDIENCES = ["spiffe://demo.local/ns/shop/sa/orders"]
JWT_JWKS_FILE = "/etc/sidecar/jwks.json"

# file name -> arguments of `sidecar envoy-config`
VARIANTS: dict[str, list[str]] = {
    "ingress-grpc.yaml": ["--mode", "grpc"],
    "ingress-http.yaml": ["--mode", "http"],
    "ingress-noauth.yaml": ["--mode", "none"],
    "ingress-jwt-authn.yaml": [
        "--mode",
        "jwt_authn",
        "--jwt-issuer",
        JWT_ISSUER,
        *(arg for audience in JWT_AUDIENCES for arg in ("--jwt-audience", audience)),
        "--jwt-jwks-file",
        JWT_JWKS_FILE,
    ],
}


def render_all() -> dict[str, str]:
    """File name -> full YAML text (header included) of every committed config."""
    return {name: envoy_command.render_args(argv).text for name, argv in VARIANTS.items()}


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
