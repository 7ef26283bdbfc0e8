"""Errors of the identity side. Every failure carries a stable ``code`` (also the metric label)
and says whether trying again later can help (``retryable``).

The codes are a closed set, :class:`IdentityCode`: the RFC 6749 §5.2 / RFC 8693 §2.2.2 /
RFC 9449 §7 error codes an issuer may send, and our own for failures on this side. An issuer's
code outside that set becomes ``issuer_error`` (the original is kept, escaped, in the detail):
an issuer must not decide how many metric series we keep.
"""

from __future__ import annotations

import enum

from sidecar.errors import SidecarError


class IdentityCode(enum.StrEnum):
    """Why a token could not be obtained. Values are stable: metric labels and log fields."""

    # Sent by the issuer (RFC 6749 §5.2, RFC 8693 §2.2.2, RFC 9449 §7).
    INVALID_REQUEST = "invalid_request"
    INVALID_CLIENT = "invalid_client"
    INVALID_GRANT = "invalid_grant"
    UNAUTHORIZED_CLIENT = "unauthorized_client"
    UNSUPPORTED_GRANT_TYPE = "unsupported_grant_type"
    INVALID_SCOPE = "invalid_scope"
    INVALID_TARGET = "invalid_target"
    ACCESS_DENIED = "access_denied"
    INVALID_DPOP_PROOF = "invalid_dpop_proof"
    USE_DPOP_NONCE = "use_dpop_nonce"
    SERVER_ERROR = "server_error"
    TEMPORARILY_UNAVAILABLE = "temporarily_unavailable"
    #: The issuer sent an OAuth error code not in this list.
    ISSUER_ERROR = "issuer_error"
    # Ours.
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    BAD_RESPONSE = "bad_response"
    DISCOVERY_FAILED = "discovery_failed"
    SUBJECT_TOKEN_UNAVAILABLE = "subject_token_unavailable"
    BINDING_MISMATCH = "binding_mismatch"
    TOKEN_EXPIRED = "token_expired"
    NO_VALID_TOKEN = "no_valid_token"
    INTERNAL_ERROR = "internal_error"
    #: The issuer's discovery document says it does not take ES256 DPoP proofs.
    DPOP_UNSUPPORTED = "dpop_unsupported"
    #: The SPIFFE Workload API refused (a gRPC status other than unavailable/deadline/denied).
    WORKLOAD_API_REFUSED = "workload_api_refused"

    @classmethod
    def from_issuer(cls, code: str) -> IdentityCode:
        """The issuer's ``error`` as one of ours; unknown codes collapse to ``issuer_error``."""
        try:
            known = cls(code)
        except ValueError:
            return cls.ISSUER_ERROR
        return known if known in _ISSUER_CODES else cls.ISSUER_ERROR

    @classmethod
    def from_grpc_status(cls, status: str) -> IdentityCode:
        """A Workload API gRPC status name (``permission_denied``, ...) as one of ours."""
        return _GRPC_CODES.get(status, cls.WORKLOAD_API_REFUSED)


_ISSUER_CODES = frozenset(
    {
        IdentityCode.INVALID_REQUEST,
        IdentityCode.INVALID_CLIENT,
        IdentityCode.INVALID_GRANT,
        IdentityCode.UNAUTHORIZED_CLIENT,
        IdentityCode.UNSUPPORTED_GRANT_TYPE,
        IdentityCode.INVALID_SCOPE,
        IdentityCode.INVALID_TARGET,
        IdentityCode.ACCESS_DENIED,
        IdentityCode.INVALID_DPOP_PROOF,
        IdentityCode.USE_DPOP_NONCE,
        IdentityCode.SERVER_ERROR,
        IdentityCode.TEMPORARILY_UNAVAILABLE,
    }
)

_GRPC_CODES = {
    "unavailable": IdentityCode.UNAVAILABLE,
    "deadline_exceeded": IdentityCode.TIMEOUT,
    "permission_denied": IdentityCode.ACCESS_DENIED,
}

#: Codes that another attempt with the same input cannot fix (RFC 6749 §5.2, RFC 8693 §2.2.2).
#: They still get retried, but only at the slowest backoff: registration entries and policies
#: do change.
NON_RETRYABLE_CODES = frozenset(
    {
        IdentityCode.INVALID_TARGET,
        IdentityCode.ACCESS_DENIED,
        IdentityCode.INVALID_CLIENT,
        IdentityCode.UNAUTHORIZED_CLIENT,
        IdentityCode.UNSUPPORTED_GRANT_TYPE,
        IdentityCode.INVALID_SCOPE,
        IdentityCode.INVALID_REQUEST,
        IdentityCode.BINDING_MISMATCH,
    }
)


class IdentityError(SidecarError):
    """A token could not be obtained. ``status`` is the issuer's HTTP status if it answered;
    ``retry_after`` its ``Retry-After`` in seconds, if any."""

    def __init__(
        self,
        code: IdentityCode,
        detail: str,
        *,
        retryable: bool | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code.value}: {detail}")
        self.code: IdentityCode = code
        self.detail = detail
        self.retryable = code not in NON_RETRYABLE_CODES if retryable is None else retryable
        self.status = status
        self.retry_after = retry_after


class NoValidToken(IdentityError):
    """No token may be sent for ``audience`` right now; ``cause`` is the last fetch error."""

    def __init__(self, audience: str, detail: str, cause: IdentityError | None = None) -> None:
        super().__init__(IdentityCode.NO_VALID_TOKEN, detail, retryable=True)
        self.audience = audience
        self.cause = cause
