"""A fake SPIFFE Workload API server, faithful to SPIRE's published protocol (the
``workload.proto`` that py-spiffe ships, served with grpcio on a Unix socket), because SPIRE
cannot be installed here.

What it does as a SPIFFE agent would (SPIFFE Workload API standard):
* every call must carry the metadata ``workload.spiffe.io: true``, else ``InvalidArgument``;
* ``FetchJWTSVID``: a JWT-SVID per request, signed ES256 by the trust domain's current key,
  ``kid`` set, no ``iss`` (SPIRE's default), ``aud`` the audiences asked for;
* ``FetchJWTBundles``: a server stream, one JWKS per trust domain, a new message whenever the
  keys change (:meth:`FakeWorkloadApi.rotate` pushes one mid-stream);
* ``ValidateJWTSVID``: verifies with the trust domain's keys;
* ``fail[method] = grpc.StatusCode.X`` makes a method answer that status (``PERMISSION_DENIED``
  for an unregistered workload, ``UNIMPLEMENTED`` for an agent without the method).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import struct_pb2
from spiffe._proto import workload_pb2, workload_pb2_grpc

from sidecar.jose.rfc7515_jws import parse_compact, sign_compact
from sidecar.jose.rfc7517_jwk import public_jwk_dict
from sidecar.jose.rfc7518_algorithms import verify_signature

HEADER = "workload.spiffe.io"


class FakeWorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    def __init__(
        self, trust_domain: str, spiffe_id: str, *, ttl: float = 300, seed: int = 1
    ) -> None:
        self.trust_domain = trust_domain
        self.spiffe_id = spiffe_id
        self.ttl = ttl
        self.keys: list[tuple[str, Any]] = []
        self.fail: dict[str, grpc.StatusCode] = {}
        self.calls: dict[str, int] = {}
        self._changed = threading.Condition()
        self._version = 0
        self._server: Any = None
        self._stopping = threading.Event()
        self.rotate()

    # -- operator actions --------------------------------------------------------------

    def rotate(self) -> str:
        """A new signing key, published beside the old one (which still verifies)."""
        kid = f"{self.trust_domain}-{len(self.keys) + 1}"
        with self._changed:
            self.keys.append((kid, ec.generate_private_key(ec.SECP256R1())))
            self._version += 1
            self._changed.notify_all()
        return kid

    def jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk_dict(key, kid=kid) for kid, key in self.keys]}

    def spiffe_bundle(self) -> dict[str, Any]:
        """The same keys as a SPIFFE bundle document (``use`` per key), for a bundle file."""
        return {"keys": [{**k, "use": "jwt-svid"} for k in self.jwks()["keys"]]}

    def start(self, socket_path: Path) -> str:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(self, self._server)  # type: ignore[no-untyped-call]
        self._server.add_insecure_port(f"unix:{socket_path}")
        self._server.start()
        return f"unix://{socket_path}"

    def stop(self) -> None:
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        if self._server is not None:
            self._server.stop(grace=0.5).wait()

    # -- protocol ----------------------------------------------------------------------

    def _admit(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if dict(context.invocation_metadata()).get(HEADER) != "true":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        code = self.fail.get(method)
        if code is not None:
            context.abort(code, f"{method}: {code.name.lower()} (on demand)")

    def sign(self, audiences: list[str], *, sub: str | None = None) -> str:
        kid, key = self.keys[-1]
        now = int(time.time())
        claims = {
            "sub": sub or self.spiffe_id,
            "aud": audiences,
            "exp": now + int(self.ttl),
            "iat": now,
        }
        return sign_compact(key, "ES256", claims, header={"kid": kid, "typ": "JWT"})

    def FetchJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._admit("FetchJWTSVID", context)
        if not request.audience:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if request.spiffe_id and request.spiffe_id != self.spiffe_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        token = self.sign(list(request.audience))
        svid = workload_pb2.JWTSVID(spiffe_id=self.spiffe_id, svid=token)
        return workload_pb2.JWTSVIDResponse(svids=[svid])

    def FetchJWTBundles(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._admit("FetchJWTBundles", context)
        seen = -1
        while context.is_active() and not self._stopping.is_set():
            with self._changed:
                if seen == self._version:
                    self._changed.wait(timeout=0.2)
                    continue
                seen = self._version
                doc = json.dumps(self.jwks()).encode()
            yield workload_pb2.JWTBundlesResponse(bundles={self.trust_domain: doc})

    def ValidateJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._admit("ValidateJWTSVID", context)
        try:
            jws = parse_compact(request.svid, max_bytes=8192)
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed JWT-SVID")
        keys = dict(self.keys)
        key = keys.get(jws.header.get("kid", ""))
        ok = key is not None and verify_signature(
            "ES256", key.public_key(), jws.signing_input, jws.signature
        )
        aud = jws.payload.get("aud", [])
        if not ok or request.audience not in (aud if isinstance(aud, list) else [aud]):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "JWT-SVID is not valid")
        claims = struct_pb2.Struct()
        claims.update(jws.payload)
        return workload_pb2.ValidateJWTSVIDResponse(spiffe_id=jws.payload["sub"], claims=claims)
