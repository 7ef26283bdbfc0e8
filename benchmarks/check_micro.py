"""Where a check's microseconds go, without sockets: the ``loop`` engine's handler (serialized
CheckRequest in, serialized CheckResponse out) and each of its stages, timed in-process.

    .venv/bin/python benchmarks/check_micro.py [--count 5000] [--profile bearer|dpop]

Stages: parse (upb), view, the decision core (bearer answered by the decision cache, and
decided again with only the verified-token cache; DPoP
with a fresh proof each time, in-memory replay store), guard (metric + decision log), encode
(the cached response head + dynamic metadata), and one raw ES256 verify for scale.
``--profile bearer|dpop`` prints cProfile's top functions for the whole handler instead.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2  # noqa: E402
from factory import NOW, make_harness  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from benchmarks.common import print_table, timed  # noqa: E402
from sidecar.authz.decision import RequestView  # noqa: E402
from sidecar.authz.decision_cache import DecisionCache  # noqa: E402
from sidecar.authz.grpc_server import LoopCheckHandler, ResponseEncoder, view_from_check  # noqa: E402
from sidecar.authz.guard import Check, CheckGuard  # noqa: E402
from sidecar.authz.replay import InMemoryReplayStore  # noqa: E402
from sidecar.authz.replay_lmdb import LmdbReplayStore  # noqa: E402
from sidecar.jose import rfc9449_dpop  # noqa: E402
from sidecar.jose.b64 import b64url_decode  # noqa: E402
from sidecar.jose.rfc7515_jws import strict_json_object  # noqa: E402
from sidecar.observability.metrics import AuthzMetrics  # noqa: E402


def check_request(view: RequestView) -> bytes:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host, http.scheme = (
        view.method,
        view.path,
        view.authority,
        view.scheme,
    )
    for name, value in view.headers.items():
        http.headers[name] = value
    http.headers["x-request-id"] = "5c14f6e9-b250-45bb-baa4-b62546bea24b"
    http.headers["user-agent"] = "wrk"
    return bytes(req.SerializeToString())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument(
        "--profile",
        choices=("bearer", "dpop"),
        help="print cProfile's top functions for this kind of check instead",
    )
    args = parser.parse_args()
    n = args.count
    h = make_harness()
    h.authz.clock = lambda: NOW
    guard = CheckGuard(h.authz, AuthzMetrics(CollectorRegistry()), "grpc")
    handler = LoopCheckHandler(guard, "https")
    bearer = check_request(h.bearer_request())
    token = h.token()
    # Fresh proofs for each DPoP row: a proof is accepted once.
    dpop = [check_request(h.dpop_request(token=token, jti=f"bench-{i}")) for i in range(n * 4)]
    handler(bearer)  # warm the token cache
    if args.profile:
        prof = cProfile.Profile()
        if args.profile == "bearer":
            prof.runcall(lambda: [handler(bearer) for _ in range(n)])
        else:
            prof.runcall(lambda: [handler(p) for p in dpop[:n]])
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return 0
    parse = external_auth_pb2.CheckRequest.FromString
    b_req = parse(bearer)
    d_reqs = [parse(p) for p in dpop[n:]]
    b_view = view_from_check(b_req, "https")
    encode = ResponseEncoder()
    b_decision = handler.guard.end(handler.guard.begin(lambda v: v, b_view))
    flow = h.authz.decision_flow

    def core(view: RequestView) -> Any:
        g = flow(view, NOW)
        try:
            g.send(None)
        except StopIteration as done:
            return done.value

    cache_on, cache_off = h.authz.decisions, DecisionCache[Any](0)

    def core_uncached(view: RequestView) -> Any:
        h.authz.decisions = cache_off  # the bearer decision cache off: the core decides
        try:
            return core(view)
        finally:
            h.authz.decisions = cache_on

    key = ec.generate_private_key(ec.SECP256R1())
    sig = key.sign(b"x" * 100, ec.ECDSA(hashes.SHA256()))
    pub = key.public_key()
    done = cast(Check, _Done(b_decision))  # duck-typed: the guard reads only step/start/flow
    d_views = [view_from_check(parse(p), "https") for p in dpop[2 * n : 3 * n]]
    d_decision = core(view_from_check(parse(dpop[-1]), "https"))
    p64 = h.proof(token).split(".")[1]
    memory = InMemoryReplayStore()
    shm = tempfile.TemporaryDirectory(dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    shared = LmdbReplayStore(Path(shm.name) / "replay", 4 * n)
    rows = [
        ("handler, bearer (cached)", timed(lambda i: handler(bearer), n)),
        ("handler, DPoP (fresh proof)", timed(lambda i: handler(dpop[i]), n)),
        ("  parse CheckRequest (upb), bearer", timed(lambda i: parse(bearer), n)),
        ("  view_from_check", timed(lambda i: view_from_check(b_req, "https"), n)),
        ("  core, bearer (decision cache hit)", timed(lambda i: core(b_view), n)),
        ("  core, bearer (token cached, decided)", timed(lambda i: core_uncached(b_view), n)),
        ("  core, DPoP", timed(lambda i: core(view_from_check(d_reqs[i], "https")), n)),
        (
            "  core, DPoP, signature not checked",
            _unsigned(lambda: timed(lambda i: core(d_views[i]), n)),
        ),
        (
            "    proof payload: base64url + strict JSON",
            timed(lambda i: strict_json_object(b64url_decode(p64), "p"), n),
        ),
        (
            "    replay insert, in memory",
            timed(lambda i: memory.check_and_insert_sync(f"k:{i}", NOW, 300), n),
        ),
        (
            "    replay insert, LMDB (workers)",
            timed(lambda i: shared.check_and_insert_sync(f"k:{i}", NOW, 300), n),
        ),
        ("  guard end (metric + log)", timed(lambda i: guard.end(done), n)),
        ("  encode response (cached head)", timed(lambda i: encode(b_decision), n)),
        ("  encode response, DPoP allow (new proof jti)", timed(lambda i: encode(d_decision), n)),
        (
            "one ES256 verify (cryptography)",
            timed(lambda i: pub.verify(sig, b"x" * 100, ec.ECDSA(hashes.SHA256())), n),
        ),
    ]
    print_table(["stage", "µs per call"], [[name, f"{us:.1f}"] for name, us in rows])
    return 0


def _unsigned(run: Callable[[], float]) -> float:
    """``run()`` with the proof's signature check answered "valid" without any work: what the
    rest of a DPoP check costs. Only here, for timing; never in the package."""
    module: Any = rfc9449_dpop
    real = module.verify_signature
    module.verify_signature = lambda *args: True
    try:
        return run()
    finally:
        module.verify_signature = real


class _Done:
    """A finished check for timing ``CheckGuard.end`` alone."""

    def __init__(self, decision: Any) -> None:
        self.step = decision
        self.start = time.perf_counter()
        self.flow = None
        self.view = None


if __name__ == "__main__":
    sys.exit(main())
