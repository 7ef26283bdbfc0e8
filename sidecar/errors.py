"""One root error for the package; every failure a caller can see carries a stable code.

The deny reasons are a closed set (docs/ARCHITECTURE.md "Reason codes"): the same strings appear
in responses, logs and metric labels, so renaming one is a breaking change.
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Why a request was denied. Values are stable wire strings."""

    MISSING_CREDENTIALS = "missing_credentials"
    MALFORMED_TOKEN = "malformed_token"
    ALG_NOT_ALLOWED = "alg_not_allowed"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    UNTRUSTED_ISSUER = "untrusted_issuer"
    TRUST_DOMAIN_MISMATCH = "trust_domain_mismatch"
    WRONG_TYPE = "wrong_type"
    WRONG_AUDIENCE = "wrong_audience"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    PROOF_MISSING = "proof_missing"
    PROOF_INVALID = "proof_invalid"
    PROOF_KEY_MISMATCH = "proof_key_mismatch"
    HTM_MISMATCH = "htm_mismatch"
    HTU_MISMATCH = "htu_mismatch"
    UNKNOWN_AUTHORITY = "unknown_authority"
    ATH_MISMATCH = "ath_mismatch"
    IAT_OUT_OF_WINDOW = "iat_out_of_window"
    REPLAYED = "replayed"
    NONCE_REQUIRED = "nonce_required"
    NONCE_INVALID = "nonce_invalid"
    BEARER_NOT_ALLOWED = "bearer_not_allowed"
    REVOKED = "revoked"
    POLICY_DENIED = "policy_denied"
    REPLAY_STORE_UNAVAILABLE = "replay_store_unavailable"
    #: The replay store restarted (memory lost) after this proof could have been used.
    PROOF_PREDATES_RESTART = "proof_predates_restart"
    # Not produced by the core: the transports' fail-closed guard when the core itself raised.
    INTERNAL_ERROR = "internal_error"


#: Reasons that are about the DPoP proof rather than the access token (RFC 9449 §7.1 uses
#: ``invalid_dpop_proof`` for these, ``invalid_token`` for the rest).
PROOF_REASONS = frozenset(
    {
        Reason.PROOF_MISSING,
        Reason.PROOF_INVALID,
        Reason.PROOF_KEY_MISMATCH,
        Reason.HTM_MISMATCH,
        Reason.HTU_MISMATCH,
        Reason.UNKNOWN_AUTHORITY,
        Reason.ATH_MISMATCH,
        Reason.IAT_OUT_OF_WINDOW,
        Reason.REPLAYED,
    }
)
NONCE_REASONS = frozenset({Reason.NONCE_REQUIRED, Reason.NONCE_INVALID})


def status_for(reason: Reason) -> int:
    """HTTP status for a deny reason: 401 authentication, 403 policy, 503 our own outage."""
    if reason is Reason.POLICY_DENIED:
        return 403
    if reason in (Reason.REPLAY_STORE_UNAVAILABLE, Reason.PROOF_PREDATES_RESTART):
        return 503
    if reason is Reason.INTERNAL_ERROR:
        return 500
    return 401


class SidecarError(Exception):
    """Root of every error this package raises on purpose."""

    code: str = "error"


class AuthError(SidecarError):
    """A credential failed verification. ``reason`` is one of the closed set of codes."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.code = reason.value
        self.detail = detail


class ConfigError(SidecarError):
    """Configuration is invalid; the message names the key and what was expected (the fix).

    ``where`` (``file:line``, or the environment variable that set the value) is filled in by
    the loader; ``hide_value`` keeps ``got`` out of the message (values from the environment or
    a secret file are never shown). ``got`` is never part of ``args``, so no traceback or repr
    shows it either."""

    code = "config_error"

    def __init__(self, key: str, expected: str, got: object = None) -> None:
        super().__init__(key, expected)
        self.key = key
        self.expected = expected
        self.got = got
        self.where: str | None = None
        source = _env_source(got)
        self.hide_value = source is not None
        self.where = source

    def __str__(self) -> str:
        where = f"{self.where}: " if self.where else ""
        shown = "" if self.got is None or self.hide_value else f", got {self.got!r}"
        return f"{where}{self.key}: expected {self.expected}{shown}"


def _env_source(got: object) -> str | None:
    """The variable an override came from (``config_source.EnvValue.source``), also when the
    value is a list or mapping holding one."""
    if isinstance(got, list | tuple):
        return next(filter(None, map(_env_source, got)), None)
    if isinstance(got, dict):
        return next(filter(None, map(_env_source, got.values())), None)
    source = getattr(got, "source", None)
    return source if isinstance(source, str) else None


class ConfigErrors(ConfigError):
    """Every mistake found in one configuration, each with its place; printed one a line."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.key, first.expected)
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class ReplayStoreUnavailable(SidecarError):
    """The replay store cannot answer (down, or full): callers must fail closed."""

    code = Reason.REPLAY_STORE_UNAVAILABLE.value
