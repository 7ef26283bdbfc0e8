"""The OAuth wire format of the token endpoints (sans-IO): form parsing per RFC 6749 §3.2 and
RFC 8693 §2.1, success responses per RFC 6749 §5.1 / RFC 8693 §2.2.1, error responses per
RFC 6749 §5.2 (plus RFC 8693 ``invalid_target`` and RFC 9449 ``invalid_dpop_proof``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import parse_qsl

from sidecar.broker.codes import BrokerReason, OAuthCode
from sidecar.errors import SidecarError
from sidecar.jose.wimse_wit import WIT_TOKEN_TYPE as WIT_TOKEN_TYPE  # re-exported

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"

MAX_FORM_BYTES = 64 * 1024
MAX_FORM_FIELDS = 64
MAX_AUDIENCES = 16
MAX_AUDIENCE_CHARS = 1024

#: RFC 6749 §3.2: "Request and response parameters MUST NOT be included more than once."
#: (RFC 8693 §2.1 makes ``audience`` and ``resource`` the exceptions.)
_SINGLE = (
    "grant_type",
    "subject_token",
    "subject_token_type",
    "actor_token",
    "actor_token_type",
    "requested_token_type",
    "scope",
    "client_id",
)


class OAuthError(SidecarError):
    """An RFC 6749 §5.2 error response. ``reason`` is the finer cause for audit and metrics
    (a closed set of short codes); ``error`` is what the client sees."""

    def __init__(
        self,
        error: OAuthCode,
        description: str,
        *,
        status: int = 400,
        reason: BrokerReason | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(f"{error}: {description}")
        self.code = error
        self.error = error
        self.description = description
        self.status = status
        self.reason = reason or BrokerReason(error.value)
        self.headers = headers

    def body(self) -> bytes:
        # RFC 6749 §5.2: error_description uses %x20-21 / %x23-5B / %x5D-7E only.
        text = "".join(c if " " <= c <= "~" and c not in '"\\' else "'" for c in self.description)
        doc = {"error": self.error, "error_description": text[:500]}
        return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class TokenHttpRequest:
    """What a token endpoint needs from an HTTP request, transport-free."""

    content_type: str | None
    body: bytes | None  # None: larger than MAX_FORM_BYTES, not read
    authorization: str | None
    dpop: tuple[str, ...]  # every DPoP header, to detect duplicates
    htu: str | None  # None: no Host header


class Form:
    """A parsed form body: every value of every parameter, in order."""

    __slots__ = ("_values", "pairs")

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = tuple(pairs)
        self._values: dict[str, list[str]] = {}
        for name, value in pairs:
            self._values.setdefault(name, []).append(value)

    def all(self, name: str) -> list[str]:
        return self._values.get(name, [])

    def one(self, name: str, *, required: bool) -> str | None:
        values = self._values.get(name, ())
        if len(values) > 1:
            raise OAuthError(OAuthCode.INVALID_REQUEST, f"parameter {name} is repeated")
        if not values or values[0] == "":
            # RFC 6749 §3.2: "Parameters sent without a value MUST be treated as if they
            # were omitted from the request."
            if required:
                raise OAuthError(OAuthCode.INVALID_REQUEST, f"parameter {name} is missing")
            return None
        return values[0]


#: Form parameters of client authentication methods we do not offer (RFC 6749 §2.3.1,
#: RFC 7523 §2.2).
_CLIENT_CREDENTIALS = ("client_secret", "client_assertion", "client_assertion_type")


def no_client_authentication(authorization: str | None, form: Form | None = None) -> None:
    """The broker authenticates workloads by attestation, never by client credentials
    (``token_endpoint_auth_methods_supported: ["none"]``). A client that tries anyway gets
    RFC 6749 §5.2 ``invalid_client``: "If the client attempted to authenticate via the
    Authorization request header field, the authorization server MUST respond with an HTTP
    401 (Unauthorized) status code and include the WWW-Authenticate response header field
    matching the authentication scheme used by the client."
    """
    if authorization:
        scheme = authorization.split(" ", 1)[0]
        scheme = scheme if scheme.isalnum() and len(scheme) <= 20 else "Basic"
        raise OAuthError(
            OAuthCode.INVALID_CLIENT,
            "client authentication is not supported here (auth method: none)",
            status=401,
            headers=(("WWW-Authenticate", f'{scheme} realm="sidecar-broker"'),),
        )
    if form is not None and any(form.all(name) for name in _CLIENT_CREDENTIALS):
        # 400, not 401: RFC 9110 §15.5.2 makes a 401 carry a WWW-Authenticate challenge, and
        # any challenge would name an HTTP authentication scheme we do not accept. RFC 6749
        # §5.2 only MAY-s the 401 for credentials sent outside the Authorization header.
        raise OAuthError(
            OAuthCode.INVALID_CLIENT,
            "client authentication is not supported here (auth method: none)",
        )


def parse_request(request: TokenHttpRequest) -> Form:
    """Client authentication (refused), then the form."""
    no_client_authentication(request.authorization)
    if request.body is None:
        raise OAuthError(OAuthCode.INVALID_REQUEST, "the form is too large")
    return parse_form(request.content_type, request.body)


def parse_form(content_type: str | None, body: bytes) -> Form:
    """RFC 6749 §3.2: the token endpoint takes ``application/x-www-form-urlencoded``."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime != FORM_CONTENT_TYPE:
        raise OAuthError(OAuthCode.INVALID_REQUEST, f"the body must be {FORM_CONTENT_TYPE}")
    if len(body) > MAX_FORM_BYTES:
        raise OAuthError(OAuthCode.INVALID_REQUEST, "the form is too large")
    try:
        text = body.decode("ascii")
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=bool(text),
            max_num_fields=MAX_FORM_FIELDS,
            errors="strict",
        )
    except (UnicodeDecodeError, ValueError):
        raise OAuthError(OAuthCode.INVALID_REQUEST, "the form body is malformed") from None
    form = Form(pairs)
    no_client_authentication(None, form)
    if len(form.pairs) > 1:
        for name in _SINGLE:
            if len(form.all(name)) > 1:
                raise OAuthError(OAuthCode.INVALID_REQUEST, f"parameter {name} is repeated")
    return form


def targets(form: Form) -> list[str]:
    """The requested audiences (RFC 8693 §2.1 ``audience``, repeatable), de-duplicated in
    order. ``resource`` (RFC 8707) is refused rather than silently ignored: this issuer names
    targets by audience only."""
    if form.all("resource"):
        raise OAuthError(
            OAuthCode.INVALID_TARGET, "resource indicators are not supported; use audience"
        )
    out: list[str] = []
    for aud in form.all("audience"):
        if not aud:
            continue
        if len(aud) > MAX_AUDIENCE_CHARS or not aud.isprintable():
            raise OAuthError(OAuthCode.INVALID_REQUEST, "an audience is too long or not printable")
        if aud not in out:
            out.append(aud)
    if not out:
        raise OAuthError(OAuthCode.INVALID_REQUEST, "at least one audience is required")
    if len(out) > MAX_AUDIENCES:
        raise OAuthError(
            OAuthCode.INVALID_REQUEST, f"at most {MAX_AUDIENCES} audiences per request"
        )
    return out


@dataclass(frozen=True, slots=True)
class ExchangeRequest:
    subject_token: str
    audiences: list[str]
    #: A WIT is asked for (``requested_token_type``): it has no audience.
    wit: bool = False


def parse_exchange(form: Form) -> ExchangeRequest:
    """RFC 8693 §2.1 request checks (grant type first, so a client speaking another grant
    learns that before anything else)."""
    grant = form.one("grant_type", required=True)
    if grant != TOKEN_EXCHANGE_GRANT:
        raise OAuthError(
            OAuthCode.UNSUPPORTED_GRANT_TYPE, f"only {TOKEN_EXCHANGE_GRANT} is supported"
        )
    subject_token = form.one("subject_token", required=True)
    subject_type = form.one("subject_token_type", required=True)
    assert subject_token is not None
    if subject_type != JWT_TOKEN_TYPE:
        raise OAuthError(
            OAuthCode.INVALID_REQUEST,
            f"subject_token_type must be {JWT_TOKEN_TYPE} (a service-account token)",
            reason=BrokerReason.SUBJECT_TOKEN_TYPE,
        )
    if form.one("actor_token", required=False) is not None:
        raise OAuthError(OAuthCode.INVALID_REQUEST, "delegation (actor_token) is not supported")
    requested = form.one("requested_token_type", required=False)
    if requested not in (None, ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE, WIT_TOKEN_TYPE):
        raise OAuthError(
            OAuthCode.INVALID_REQUEST,
            f"requested_token_type must be {ACCESS_TOKEN_TYPE} or {WIT_TOKEN_TYPE}",
        )
    if form.one("scope", required=False) is not None:
        # Issuing without the scope asked for would be silently granting something else.
        raise OAuthError(OAuthCode.INVALID_SCOPE, "this issuer grants audiences, not scopes")
    if requested == WIT_TOKEN_TYPE:
        if form.all("audience") or form.all("resource"):
            raise OAuthError(OAuthCode.INVALID_REQUEST, "a WIT has no audience: send none with it")
        return ExchangeRequest(subject_token=subject_token, audiences=[], wit=True)
    return ExchangeRequest(subject_token=subject_token, audiences=targets(form))


def requests_wit(form: Form) -> bool:
    """True when the request asks for a WIT (``requested_token_type``), False for an access
    token (the default); anything else is refused."""
    requested = form.one("requested_token_type", required=False)
    if requested not in (None, ACCESS_TOKEN_TYPE, WIT_TOKEN_TYPE):
        raise OAuthError(
            OAuthCode.INVALID_REQUEST,
            f"requested_token_type must be {ACCESS_TOKEN_TYPE} or {WIT_TOKEN_TYPE}",
        )
    return requested == WIT_TOKEN_TYPE


def _exchange_response(token: str, issued_type: str, token_type: str, expires_in: int) -> bytes:
    """An RFC 8693 §2.2.1 success body (the issued token travels as ``access_token``)."""
    doc = {
        "access_token": token,
        "issued_token_type": issued_type,
        "token_type": token_type,
        "expires_in": expires_in,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def wit_response(wit: str, expires_in: int) -> bytes:
    """RFC 8693 §2.2.1 with a WIT: not an access token, so ``token_type`` is ``N_A``."""
    return _exchange_response(wit, WIT_TOKEN_TYPE, "N_A", expires_in)


def token_response(access_token: str, expires_in: int) -> bytes:
    """RFC 8693 §2.2.1 / RFC 9449 §5: a DPoP-bound access token."""
    return _exchange_response(access_token, ACCESS_TOKEN_TYPE, "DPoP", expires_in)


#: RFC 6749 §5.1: "The authorization server MUST include the HTTP "Cache-Control" response
#: header field with a value of "no-store" in any response containing tokens, credentials,
#: or other sensitive information, as well as the "Pragma" response header field with a
#: value of "no-cache"." Errors get the same headers.
NO_STORE = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))
