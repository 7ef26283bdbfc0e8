"""Where the egress proxy's own microseconds go, without sockets: each stage of its request
path that is the sidecar's and not the framework's, timed in-process (CPU time).

    .venv/bin/python benchmarks/egress_micro.py [--count 5000]

Stages: the cached token look-up, the DPoP proof (a fresh one each time: jti, iat, ath, htu,
one ES256 signature; and the raw signature alone for scale), the request and response header
rules, and the metrics of one answered request. What aiohttp costs around them (client
request, parsers, writes) is in the profile: benchmarks/profile_egress.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from multidict import CIMultiDict  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from benchmarks.common import print_table, timed  # noqa: E402
from sidecar.egress.headers import request_headers, response_headers  # noqa: E402
from sidecar.egress.metrics import EgressMetrics  # noqa: E402
from sidecar.identity.key import generate_signer  # noqa: E402
from sidecar.identity.schedule import AudienceState, RefreshPolicy  # noqa: E402
from sidecar.identity.token import IssuedToken  # noqa: E402

NOW = 1_800_000_000.0
# What wrk sends, and what the benchmark's Envoy upstream answers.
REQUEST = CIMultiDict({"Host": "127.0.0.1:15001"})
APP_REQUEST = CIMultiDict(
    {
        "Host": "127.0.0.1:15001",
        "User-Agent": "python-requests/2.32",
        "Accept": "*/*",
        "Accept-Encoding": "gzip, deflate",
        "Connection": "keep-alive",
        "Content-Type": "application/json",
    }
)
RESPONSE = CIMultiDict(
    {
        "content-length": "12",
        "content-type": "text/plain",
        "date": "Wed, 02 Dec 2026 05:00:00 GMT",
        "server": "envoy",
    }
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    args = parser.parse_args()
    n = args.count
    signer = generate_signer()
    key = ec.generate_private_key(ec.SECP256R1())
    ecdsa = ec.ECDSA(hashes.SHA256())
    token = IssuedToken("h.p." + "s" * 86, "DPoP", NOW + 3600, NOW, "https://orders.example")
    state = AudienceState("https://orders.example", RefreshPolicy())
    state.on_success(token, NOW, 0.5)
    metrics = EgressMetrics(CollectorRegistry())
    url = "http://127.0.0.1:15002/orders/42"

    stages: list[tuple[str, Callable[[int], Any]]] = [
        ("token look-up (cached)", lambda i: state.usable(NOW + 1)),
        (
            "DPoP proof (fresh; ath cached)",
            lambda i: signer.proof(
                method="GET", url=url, now=NOW + i, access_token=token.token, nonce=None
            ),
        ),
        ("  of which: raw ES256 sign", lambda i: key.sign(b"x" * 300, ecdsa)),
        (
            "request headers (wrk: Host only)",
            lambda i: request_headers(REQUEST.items(), drop_credentials=True, via="1.1 sidecar"),
        ),
        (
            "request headers (6 app headers)",
            lambda i: request_headers(
                APP_REQUEST.items(), drop_credentials=True, via="1.1 sidecar"
            ),
        ),
        ("response headers (4)", lambda i: response_headers(RESPONSE.items())),
        ("metrics (one request)", lambda i: metrics.request("bench", 200, 0.0001, 0.0004)),
    ]
    for _, fn in stages:  # warm up
        timed(fn, min(n, 200))
    rows = [[name, f"{timed(fn, n):.2f}"] for name, fn in stages]
    print_table(["stage", "CPU µs"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
