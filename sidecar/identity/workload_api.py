"""The SPIFFE Workload API (gRPC on a Unix socket) through py-spiffe, kept off the event loop.

py-spiffe's client is synchronous, so every call runs in a worker thread with a deadline on
both the gRPC call and the wait for the thread. The socket is ``unix:///path`` from the
configuration, else ``SPIFFE_ENDPOINT_SOCKET`` (SPIFFE Workload Endpoint §4). py-spiffe adds
the ``workload.spiffe.io: true`` metadata the Workload API requires on every call.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from typing import Any

from sidecar.errors import SidecarError
from sidecar.jose.rfc7517_jwk import public_jwk_dict
from sidecar.jose.spiffe_bundle import JWT_SVID

SOCKET_ENV = "SPIFFE_ENDPOINT_SOCKET"


class WorkloadApiUnavailable(SidecarError):
    """The Workload API could not answer; ``code`` is the gRPC status name when it did."""

    def __init__(self, detail: str, code: str = "unavailable") -> None:
        super().__init__(detail)
        self.code = code


@dataclass(frozen=True, slots=True)
class JwtSvidResult:
    token: str
    spiffe_id: str
    expires_at: float


def endpoint_socket(configured: str | None) -> str | None:
    """The Workload API address: the configured one, else ``SPIFFE_ENDPOINT_SOCKET``."""
    return configured or os.environ.get(SOCKET_ENV) or None


def _status_name(exc: BaseException) -> str:
    # py-spiffe wraps the grpc.RpcError it got; its code names the failure (PermissionDenied…)
    cause: BaseException | None = exc
    while cause is not None:
        code = getattr(cause, "code", None)
        if callable(code):
            try:
                return str(code().name).lower()
            except Exception:  # a foreign object with another code()
                return "unavailable"
        cause = cause.__cause__
    return "unavailable"


class WorkloadApi:
    """One Workload API client, created on first use; calls bounded by ``timeout``."""

    def __init__(self, socket: str | None, *, timeout: float = 5.0) -> None:
        self.socket = endpoint_socket(socket)
        self.timeout = timeout
        self._client: Any = None
        self._lock = threading.Lock()

    def _get_client(self) -> Any:
        from spiffe import WorkloadApiClient

        with self._lock:
            if self._client is None:
                if self.socket is None:
                    raise WorkloadApiUnavailable(f"no Workload API socket ({SOCKET_ENV} unset)")
                self._client = WorkloadApiClient(self.socket, default_timeout=self.timeout)
            return self._client

    async def _call(self, what: str, fn: Any, *args: Any) -> Any:
        def run() -> Any:
            try:
                return fn(self._get_client(), *args)
            except WorkloadApiUnavailable:
                raise
            except Exception as exc:  # py-spiffe raises its own and grpc's
                raise WorkloadApiUnavailable(
                    f"{what}: {type(exc).__name__}: {str(exc)[:200]}", _status_name(exc)
                ) from None

        try:
            return await asyncio.wait_for(asyncio.to_thread(run), self.timeout + 1.0)
        except TimeoutError:
            raise WorkloadApiUnavailable(
                f"{what}: no answer in {self.timeout} s", "timeout"
            ) from None

    async def jwt_svid(self, audience: str) -> JwtSvidResult:
        def fetch(client: Any, aud: str) -> JwtSvidResult:
            svid = client.fetch_jwt_svid(audience={aud})
            return JwtSvidResult(svid.token, str(svid.spiffe_id), float(svid.expiry))

        result: JwtSvidResult = await self._call("FetchJWTSVID", fetch, audience)
        return result

    async def jwt_bundle(self, trust_domain: str) -> dict[str, Any]:
        """The trust domain's JWT bundle as a SPIFFE bundle document (every key ``jwt-svid``:
        FetchJWTBundles serves only JWT-SVID keys)."""

        def fetch(client: Any, name: str) -> dict[str, Any]:
            from spiffe import TrustDomain

            bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(TrustDomain(name))
            if bundle is None:
                raise WorkloadApiUnavailable(f"FetchJWTBundles: no bundle for {name}", "not_found")
            keys = [
                public_jwk_dict(key, kid=kid) | {"use": JWT_SVID}
                for kid, key in bundle.jwt_authorities.items()
            ]
            return {"keys": keys}

        doc: dict[str, Any] = await self._call("FetchJWTBundles", fetch, trust_domain)
        return doc

    async def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)
