"""The sans-IO half of getting a token: what to send and what the answer means.

* RFC 8693 §2.1 token-exchange request (the ``k8s`` attestor) and the broker's attestation
  request (the ``unix`` attestor): form bodies.
* RFC 9449 §8: an authorization server may demand a nonce — ``400`` with
  ``{"error": "use_dpop_nonce"}`` and a ``DPoP-Nonce`` header; the client retries once with it.
* RFC 6749 §5.1 / RFC 8693 §2.2.1 success response, and §5.2 error response.

No sockets here: the attestors do the I/O and call these functions with what they got.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sidecar.identity.errors import IdentityCode, IdentityError
from sidecar.identity.token import (
    IssuedToken,
    bound_jkt,
    confirmed_jwk_thumbprint,
    numeric_claim,
    unverified_claims,
)
from sidecar.jose.wimse_wit import WIT_TOKEN_TYPE

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
#: The token source's key for the workload's WIT: a WIT has no audience, so its slot is named
#: by the token type asked for (``/tokens`` and the identity metrics show it under this name).
WIT_AUDIENCE = WIT_TOKEN_TYPE

MAX_RESPONSE_BYTES = 64 * 1024
MAX_TOKEN_BYTES = 16 * 1024
# RFC 6749 §5.2: error and error_description use %x20-21 / %x23-5B / %x5D-7E.
_ERROR_CODE = re.compile(r"^[\x20\x21\x23-\x5b\x5d-\x7e]{1,64}$")
# RFC 6750 §2.1 b64token, which is also what RFC 9449 §7.1 allows for a DPoP token.
_TOKEN68 = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
_NONCE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,512}$")  # RFC 9449 §8.1 NQCHAR


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """One form POST to a token endpoint; ``htu`` is the URL the DPoP proof names."""

    url: str
    htu: str
    form: tuple[tuple[str, str], ...]
    #: A WIT is asked for (``requested_token_type``), not an access token.
    wit: bool = False


def exchange_form(
    *,
    subject_token: str,
    audiences: Sequence[str],
    subject_token_type: str = JWT_TOKEN_TYPE,
    requested_token_type: str | None = None,
    scope: str | None = None,
    client_id: str | None = None,
    resources: Sequence[str] = (),
) -> tuple[tuple[str, str], ...]:
    """RFC 8693 §2.1: ``audience`` and ``resource`` may each be repeated."""
    form = [
        ("grant_type", TOKEN_EXCHANGE_GRANT),
        ("subject_token", subject_token),
        ("subject_token_type", subject_token_type),
    ]
    form += [("audience", aud) for aud in audiences]
    form += [("resource", res) for res in resources]
    if requested_token_type:
        form.append(("requested_token_type", requested_token_type))
    if scope:
        form.append(("scope", scope))
    if client_id:
        form.append(("client_id", client_id))
    return tuple(form)


def attestation_form(audiences: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The broker's Unix-socket endpoint: the caller is identified by its peer credentials,
    so the form names only the audience(s) — or, for :data:`WIT_AUDIENCE`, asks for a WIT
    (which has no audience)."""
    if list(audiences) == [WIT_AUDIENCE]:
        return (("requested_token_type", WIT_TOKEN_TYPE),)
    return tuple(("audience", aud) for aud in audiences)


def _json_object(body: bytes) -> dict[str, object] | None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        lower = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lower), None)
    return value


def nonce_challenge(status: int, headers: Mapping[str, str], body: bytes) -> str | None:
    """The nonce an authorization server demands (RFC 9449 §8), or None.

    §8: "the authorization server responds with an HTTP 400 (Bad Request) ... error code
    use_dpop_nonce ... and the server-provided nonce value in the DPoP-Nonce header". A 401
    with ``WWW-Authenticate: DPoP error="use_dpop_nonce"`` (the resource-server form, §9) is
    accepted too: some servers answer that way on their token endpoint."""
    nonce = _header(headers, "DPoP-Nonce")
    if nonce is None or not _NONCE.match(nonce):
        return None
    if status == 400:
        doc = _json_object(body[:MAX_RESPONSE_BYTES])
        return nonce if doc is not None and doc.get("error") == "use_dpop_nonce" else None
    if status == 401:
        challenge = _header(headers, "WWW-Authenticate") or ""
        return nonce if "use_dpop_nonce" in challenge else None
    return None


_PROOF_ERRORS = ("invalid_dpop_proof", "use_dpop_nonce")


def proof_refused(status: int, headers: Mapping[str, str], body: bytes) -> bool:
    """True if the answer refuses the DPoP proof (RFC 9449 §5/§8: ``invalid_dpop_proof`` or
    ``use_dpop_nonce``, in the error object or a DPoP challenge) — a refusal after which a
    proof with a corrected ``iat`` may succeed."""
    if status == 400:
        doc = _json_object(body[:MAX_RESPONSE_BYTES])
        return doc is not None and doc.get("error") in _PROOF_ERRORS
    if status == 401:
        challenge = _header(headers, "WWW-Authenticate") or ""
        return any(error in challenge for error in _PROOF_ERRORS)
    return False


def fresh_nonce(headers: Mapping[str, str]) -> str | None:
    """A ``DPoP-Nonce`` offered in any response (§8.2: the server may supply a new nonce at
    any time), if well formed."""
    nonce = _header(headers, "DPoP-Nonce")
    return nonce if nonce is not None and _NONCE.match(nonce) else None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = _header(headers, "Retry-After")
    if value is None or not value.strip().isdigit():
        return None  # the HTTP-date form is rare for token endpoints: ignored
    return min(float(value.strip()), 3600.0)


def _clean(text: object, limit: int = 200) -> str:
    if not isinstance(text, str):
        return ""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


def error_from_response(status: int, headers: Mapping[str, str], body: bytes) -> IdentityError:
    """An RFC 6749 §5.2 error response (or whatever a non-200 was) as an IdentityError.

    5xx, 408 and 429 are retryable whatever code they carry; 4xx codes from the issuer keep
    the issuer's code so that ``invalid_target`` / ``access_denied`` are told apart."""
    doc = _json_object(body[:MAX_RESPONSE_BYTES])
    code = doc.get("error") if doc is not None else None
    description = _clean(doc.get("error_description")) if doc is not None else ""
    retry_after = _retry_after(headers)
    if status >= 500 or status in (408, 429):
        shown = f"{code}: " if isinstance(code, str) and _ERROR_CODE.match(code) else ""
        return IdentityError(
            IdentityCode.SERVER_ERROR if status >= 500 else IdentityCode.TEMPORARILY_UNAVAILABLE,
            f"issuer answered HTTP {status}: {shown}{description}".rstrip(": "),
            retryable=True,
            status=status,
            retry_after=retry_after,
        )
    if isinstance(code, str) and _ERROR_CODE.match(code):
        detail = description or f"issuer answered HTTP {status}"
        known = IdentityCode.from_issuer(code)
        if known is IdentityCode.ISSUER_ERROR:
            detail = f"{code}: {detail}"  # _ERROR_CODE admits only printable ASCII
        return IdentityError(known, detail, status=status, retry_after=retry_after)
    return IdentityError(
        IdentityCode.BAD_RESPONSE,
        f"issuer answered HTTP {status} without an OAuth error object",
        retryable=status not in (400, 404, 405),
        status=status,
        retry_after=retry_after,
    )


def parse_token_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    audience: str,
    requested_at: float,
    expected_jkt: str,
    require_dpop: bool,
    clock_offset: float = 0.0,
    wit: bool = False,
) -> IssuedToken:
    """Turn a token endpoint's answer into an IssuedToken, or raise IdentityError.

    ``requested_at`` is when the request was sent: RFC 6749 §5.1 ``expires_in`` counts from
    the response, so counting from the request errs on the safe side. If the token is a JWT
    whose ``exp`` comes earlier still, that wins: a token is never kept past either bound.
    ``exp`` is on the issuer's clock: ``clock_offset`` (issuer minus ours) brings it to ours.
    ``wit``: the answer must be a WIT bound to our key (:func:`_wit_kind`)."""
    if status != 200:
        raise error_from_response(status, headers, body)
    if len(body) > MAX_RESPONSE_BYTES:
        raise IdentityError(
            IdentityCode.BAD_RESPONSE, "token response is too large", retryable=True
        )
    doc = _json_object(body)
    if doc is None:
        raise IdentityError(
            IdentityCode.BAD_RESPONSE, "token response is not a JSON object", retryable=True
        )
    token = doc.get("access_token")
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
        raise IdentityError(
            IdentityCode.BAD_RESPONSE, "token response has no access_token", retryable=True
        )
    if not _TOKEN68.match(token):
        raise IdentityError(
            IdentityCode.BAD_RESPONSE,
            "access_token has characters a header cannot carry",
            retryable=True,
        )
    raw_type = doc.get("token_type")
    # RFC 6749 §7.1 / RFC 9449 §5: token_type is case-insensitive.
    token_type = raw_type.lower() if isinstance(raw_type, str) else ""
    claims = unverified_claims(token)
    if wit:
        kind = _wit_kind(doc, token_type, claims, expected_jkt)
    elif token_type == "dpop":
        kind = "DPoP"
    elif token_type == "bearer":
        if require_dpop:
            raise IdentityError(
                IdentityCode.BINDING_MISMATCH,
                "issuer returned a Bearer token although a DPoP proof was sent "
                "(set identity.require_dpop: false to accept unbound tokens)",
            )
        kind = "Bearer"
    else:
        raise IdentityError(
            IdentityCode.BAD_RESPONSE,
            f"unsupported token_type {_clean(raw_type)!r}",
            retryable=True,
        )
    expires_in = doc.get("expires_in")
    exp = numeric_claim(claims, "exp")
    if exp is not None:
        exp -= clock_offset
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float | type(None)):
        raise IdentityError(IdentityCode.BAD_RESPONSE, "expires_in is not a number", retryable=True)
    if expires_in is not None and expires_in <= 0:
        raise IdentityError(IdentityCode.BAD_RESPONSE, "expires_in is not positive", retryable=True)
    bounds = [b for b in (exp, None if expires_in is None else requested_at + expires_in) if b]
    if not bounds:
        raise IdentityError(
            IdentityCode.BAD_RESPONSE,
            "token has neither expires_in nor an exp claim",
            retryable=True,
        )
    jkt = bound_jkt(claims)
    if jkt is not None and jkt != expected_jkt:
        raise IdentityError(
            IdentityCode.BINDING_MISMATCH, "issued token is bound to another key (cnf.jkt)"
        )
    issued = doc.get("issued_token_type")
    return IssuedToken(
        token=token,
        token_type=kind,
        expires_at=min(bounds),
        issued_at=requested_at,
        audience=audience,
        issued_token_type=issued if isinstance(issued, str) else None,
        claims=claims,
    )


def _wit_kind(
    doc: Mapping[str, object], token_type: str, claims: dict[str, object] | None, jkt: str
) -> str:
    """A WIT answer (RFC 8693 §2.2.1 shape): ``issued_token_type`` the WIT type, ``token_type``
    ``N_A`` (not an access token), and ``cnf.jwk`` our key: every WPT we send is signed with
    it, so a WIT confirming another key would make every request fail at the receiver."""
    if doc.get("issued_token_type") != WIT_TOKEN_TYPE or token_type != "n_a":
        raise IdentityError(
            IdentityCode.BAD_RESPONSE,
            f"the issuer did not answer with a WIT (issued_token_type {WIT_TOKEN_TYPE}, "
            "token_type N_A)",
            retryable=True,
        )
    if confirmed_jwk_thumbprint(claims) != jkt:
        raise IdentityError(
            IdentityCode.BINDING_MISMATCH, "the issued WIT confirms another key (cnf.jwk)"
        )
    return "WIT"
