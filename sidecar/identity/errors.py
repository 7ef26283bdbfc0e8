"""Errors of the identity side. Every failure carries a stable ``code`` (also the metric label)
and says whether trying again later can help (``retryable``).

Codes are the RFC 6749 §5.2 / RFC 8693 §2.2.2 / RFC 9449 §7 error codes when the issuer sent
one, else one of ours: ``unavailable`` (network), ``timeout``, ``server_error`` (5xx),
``bad_response`` (the issuer answered something we cannot use), ``discovery_failed``,
``subject_token_unavailable`` (the k8s / file token cannot be read), ``binding_mismatch`` (the
issued token is bound to another key), ``token_expired`` (a file token that has run out) and
``no_valid_token`` (what a request sees when the cache holds nothing it may send).
"""

from __future__ import annotations

from sidecar.errors import SidecarError

#: Issuer error codes that another attempt with the same input cannot fix (RFC 6749 §5.2,
#: RFC 8693 §2.2.2). They still get retried, but only at the slowest backoff: registration
#: entries and policies do change.
NON_RETRYABLE_CODES = frozenset(
    {
        "invalid_target",
        "access_denied",
        "invalid_client",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_request",
        "binding_mismatch",
    }
)


class IdentityError(SidecarError):
    """A token could not be obtained. ``status`` is the issuer's HTTP status if it answered;
    ``retry_after`` its ``Retry-After`` in seconds, if any."""

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        retryable: bool | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.retryable = code not in NON_RETRYABLE_CODES if retryable is None else retryable
        self.status = status
        self.retry_after = retry_after


class NoValidToken(IdentityError):
    """No token may be sent for ``audience`` right now; ``cause`` is the last fetch error."""

    def __init__(self, audience: str, detail: str, cause: IdentityError | None = None) -> None:
        super().__init__("no_valid_token", detail, retryable=True)
        self.audience = audience
        self.cause = cause
