"""``spiffe`` attestor: JWT-SVIDs from the SPIFFE Workload API (SPIFFE Workload API §6).

The local SPIFFE agent (SPIRE or another) has already attested this workload; we ask it for a
JWT-SVID per audience (``FetchJWTSVID``). JWT-SVIDs are bearer tokens (JWT-SVID §7): the
issued token's type is ``Bearer`` so the egress proxy sends ``Authorization: Bearer`` and no
DPoP proof. Refreshed by the same schedule as every other token (expiry from its ``exp``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sidecar.identity.errors import IdentityCode, IdentityError
from sidecar.identity.token import IssuedToken, numeric_claim, unverified_claims
from sidecar.identity.workload_api import WorkloadApi, WorkloadApiUnavailable

#: Workload API answers that another identical call cannot fix soon (the agent's registration
#: or the request itself is wrong): retried only at the slowest backoff.
_NOT_RETRYABLE = frozenset({"invalid_argument", "permission_denied", "unimplemented"})


class SpiffeAttestor:
    kind = "spiffe"
    max_refresh_interval: float | None = None

    def __init__(
        self, socket: str | None, *, timeout: float = 5.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._api = WorkloadApi(socket, timeout=timeout)
        self._clock = clock

    async def fetch(self, audience: str) -> IssuedToken:
        try:
            svid = await self._api.jwt_svid(audience)
        except WorkloadApiUnavailable as exc:
            raise IdentityError(
                IdentityCode.from_grpc_status(exc.code),
                f"Workload API ({exc.code}): {exc}",
                retryable=exc.code not in _NOT_RETRYABLE,
            ) from None
        claims = unverified_claims(svid.token)
        now = self._clock()
        exp = numeric_claim(claims, "exp") or svid.expires_at
        if exp <= now:
            raise IdentityError(
                IdentityCode.TOKEN_EXPIRED, "the Workload API gave an expired JWT-SVID"
            )
        iat = numeric_claim(claims, "iat")
        return IssuedToken(
            token=svid.token,
            token_type="Bearer",
            expires_at=exp,
            issued_at=iat if iat is not None and iat <= now else now,
            audience=audience,
            issued_token_type="jwt-svid",
            claims=claims,
        )

    async def close(self) -> None:
        await self._api.close()
