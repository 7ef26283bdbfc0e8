"""The broker's closed sets of codes: the OAuth ``error`` a client sees (RFC 6749 §5.2,
RFC 8693 §2.2.2, RFC 9449 §5) and the finer ``reason`` of a refusal, the label of
``sidecar_broker_refusals_total`` and ``sidecar_broker_attestation_failures_total`` and a field
of the audit record. Codes from the JOSE layer (a proof's or a subject token's ``Reason``) are
mapped onto this set, so no label value comes from outside it. ``tests/unit/test_broker_codes.py``
has a case for every reason."""

from __future__ import annotations

from enum import StrEnum

from sidecar.errors import Reason, SidecarError


class OAuthCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    INVALID_CLIENT = "invalid_client"
    INVALID_TARGET = "invalid_target"
    INVALID_SCOPE = "invalid_scope"
    INVALID_DPOP_PROOF = "invalid_dpop_proof"
    UNSUPPORTED_GRANT_TYPE = "unsupported_grant_type"
    ACCESS_DENIED = "access_denied"
    TEMPORARILY_UNAVAILABLE = "temporarily_unavailable"


class BrokerReason(StrEnum):
    # The request itself (the OAuth code is the reason when nothing finer applies).
    INVALID_REQUEST = "invalid_request"
    INVALID_CLIENT = "invalid_client"
    INVALID_TARGET = "invalid_target"
    INVALID_SCOPE = "invalid_scope"
    UNSUPPORTED_GRANT_TYPE = "unsupported_grant_type"
    SUBJECT_TOKEN_TYPE = "subject_token_type"
    NO_HOST = "no_host"
    # The DPoP proof.
    PROOF_MISSING = "proof_missing"
    PROOF_INVALID = "proof_invalid"
    HTM_MISMATCH = "htm_mismatch"
    HTU_MISMATCH = "htu_mismatch"
    IAT_OUT_OF_WINDOW = "iat_out_of_window"
    REPLAYED = "replayed"
    REPLAY_STORE_UNAVAILABLE = "replay_store_unavailable"
    # The subject token (k8s).
    MALFORMED_TOKEN = "malformed_token"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    ALG_NOT_ALLOWED = "alg_not_allowed"
    WRONG_AUDIENCE = "wrong_audience"
    UNTRUSTED_ISSUER = "untrusted_issuer"
    NOT_SERVICE_ACCOUNT = "not_service_account"
    CLUSTER_KEYS_UNAVAILABLE = "cluster_keys_unavailable"
    # The socket peer (unix).
    NO_PEER_CREDENTIALS = "no_peer_credentials"
    PEER_GONE = "peer_gone"
    PEER_CHANGED = "peer_changed"
    # Policy.
    NO_ENTRY = "no_entry"
    AUDIENCE_NOT_ALLOWED = "audience_not_allowed"
    REVOKED = "revoked"
    WIT_KEY_ALG = "wit_key_alg"


_BY_VALUE = {r.value: r for r in BrokerReason}


def from_jose(reason: Reason, fallback: BrokerReason) -> BrokerReason:
    """The broker's code for a JOSE-layer ``reason``: the same name when the broker has it,
    else ``fallback`` (``proof_invalid`` for a proof, ``malformed_token`` for a token)."""
    return _BY_VALUE.get(reason.value, fallback)


class BrokerRefusal(SidecarError):
    """A refusal for one of the closed ``reason`` codes (a metric label and audit field), with a
    free ``detail`` for the log. The attestations' errors are this one class, not copies of it."""

    def __init__(self, reason: BrokerReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
