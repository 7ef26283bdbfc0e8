"""Ingress ``auth: wimse`` routes: a WIT then a WPT per request (draft-ietf-wimse-workload-creds-02,
draft-ietf-wimse-wpt-01/-02), checked by the decision core through :func:`verify_request`.

* The WIT comes from ``Workload-Identity-Token``; its keys from the trust domain of its ``sub``
  (``authz.trust_domains``: SPIFFE bundles, keys with ``use: wit-svid``).
* The WPT comes from ``Authorization: WPT <jwt>`` (-02) or, when ``accept_proof_header`` is
  set, from ``Workload-Proof-Token`` (-01). Exactly one carrier, one value.
* ``aud`` is checked against ``authz.authorities`` (the origins this service answers to) with
  the request's path: never against ``Host``.

Errors (wpt-02 §4): a bad WIT is a 400; a missing or bad proof a 401 with
``WWW-Authenticate: WPT``; with -01 carriage a bad proof is a 400.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.authz.decision import RequestView
from sidecar.authz.target import RequestTarget
from sidecar.config_util import (
    get_bool,
    get_choice,
    get_duration,
    get_str_list,
    known_keys,
    section,
)
from sidecar.errors import AuthError, Reason
from sidecar.jose.wimse_wit import (
    WIT_HEADER,
    VerifiedWIT,
    WitKeys,
    WitPolicy,
    verify_wit,
)
from sidecar.jose.wimse_wpt import WPT_HEADER, VerifiedWPT, WptPolicy, verify_wpt

#: Scheme labels the core's deny builder uses for WIMSE routes: a failure of the WIT (400),
#: of the proof sent in Authorization (-02: 401 + WPT challenge), or in the -01 header (400).
SCHEME_WIT = "wimse-wit"
SCHEME_WPT = "wimse"
SCHEME_WPT_01 = "wimse-01"


@dataclass(frozen=True, slots=True)
class WimseSettings:
    wit: WitPolicy = field(default_factory=lambda: WitPolicy(svid=True))
    wpt: WptPolicy = field(default_factory=WptPolicy)
    #: Also take the proof from the -01 ``Workload-Proof-Token`` header.
    accept_proof_header: bool = False


def parse_wimse(root: Mapping[str, Any], path: str, leeway: float) -> WimseSettings:
    """``authz.wimse``: the WIT profile, the proof lifetime, the -01 carriage. The WIT keys are
    the ``wit-svid`` keys of ``authz.trust_domains``."""
    key = f"{path}.wimse"
    raw = section(root.get("wimse"), key)
    known_keys(raw, key, {"profile", "max_proof_lifetime", "accept_proof_header", "other_tokens"})
    profile = get_choice(raw, "profile", key, ("wit-svid", "wit"), "wit-svid")
    return WimseSettings(
        wit=WitPolicy(svid=profile == "wit-svid", leeway=leeway),
        wpt=WptPolicy(
            max_lifetime=get_duration(raw, "max_proof_lifetime", key, 300.0, minimum=1.0),
            leeway=leeway,
            # oth entries naming these headers are checked; any other entry rejects the WPT.
            other_tokens=frozenset(n.lower() for n in get_str_list(raw, "other_tokens", key, [])),
        ),
        accept_proof_header=get_bool(raw, "accept_proof_header", key, False),
    )


def _one(value: str | None, what: str, reason: Reason) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value or "," in value or " " in value:
        # Comma: the header was sent twice and merged; either way not one credential.
        raise AuthError(reason, f"not exactly one {what}")
    return value


@dataclass(frozen=True, slots=True)
class WimseCredentials:
    wit: VerifiedWIT
    wpt: VerifiedWPT


def verify_request(
    view: RequestView,
    *,
    settings: WimseSettings,
    keys: WitKeys,
    target: RequestTarget,
    now: float,
    meta: dict[str, Any],
) -> WimseCredentials:
    """Verify the WIT, then the WPT, of one request. AuthError carries the reason;
    ``meta["scheme"]`` says which part failed (see SCHEME_*)."""
    meta["scheme"] = SCHEME_WPT
    auth = view.headers.get("authorization")
    proof_01 = view.headers.get(WPT_HEADER)
    wit_text = view.headers.get(WIT_HEADER)
    if wit_text is None:
        raise AuthError(Reason.MISSING_CREDENTIALS, "no Workload-Identity-Token header")
    # Carriage first (cheap): exactly one proof carrier, one value.
    proof: str | None = None
    access_token: str | None = None
    scheme, _, rest = (auth or "").strip().partition(" ")
    if auth is not None and scheme.lower() == "bearer" and settings.accept_proof_header:
        # -01: an access token may travel beside the WPT, which must cover it (ath). It is
        # only bound here, never used for the decision.
        access_token = _one(rest, "access token", Reason.MALFORMED_TOKEN)
        auth = None
    if auth is not None:
        if scheme.lower() != "wpt":
            # -02: the WPT occupies Authorization; a bearer token beside it is not accepted.
            raise AuthError(Reason.PROOF_MISSING, "Authorization scheme is not WPT")
        if proof_01 is not None:
            raise AuthError(Reason.PROOF_INVALID, "a WPT in both Authorization and its header")
        proof = _one(rest, "WPT", Reason.PROOF_INVALID)
    elif proof_01 is not None:
        if not settings.accept_proof_header:
            raise AuthError(Reason.PROOF_MISSING, "Workload-Proof-Token (-01) is not accepted here")
        meta["scheme"] = SCHEME_WPT_01
        proof = _one(proof_01, "WPT", Reason.PROOF_INVALID)
    if proof is None:
        raise AuthError(Reason.PROOF_MISSING, "no WPT")
    carried = meta["scheme"]
    meta["scheme"] = SCHEME_WIT
    wit_value = _one(wit_text, "WIT", Reason.MALFORMED_TOKEN)
    assert wit_value is not None
    wit = verify_wit(wit_value, keys=keys, now=now, policy=settings.wit)
    meta["sub"] = wit.subject
    meta["trust_domain"] = wit.trust_domain
    if wit.kid is not None:
        meta["kid"] = wit.kid
    meta["scheme"] = carried
    wpt = verify_wpt(
        proof,
        wit=wit,
        now=now,
        policy=settings.wpt,
        check_aud=lambda aud: target.check(aud, view),
        access_token=access_token,
        headers=view.headers,
    )
    meta["proof_jti"] = wpt.jti
    return WimseCredentials(wit, wpt)


def wimse_deny_shape(
    reason: Reason, status: int, scheme: str, description: str
) -> tuple[int, str, str]:
    """(status, error code, ``WWW-Authenticate``) of a deny on a WIMSE route (wpt-02 §4):
    a bad WIT is a 400 without a challenge; a missing credential or a bad proof a 401 with a
    ``WPT`` challenge, or a 400 when the proof came by the -01 header. 403 and 5xx stay."""
    if status != 401:
        error = "insufficient_scope" if status == 403 else ""
        return status, error, ""
    if reason is Reason.MISSING_CREDENTIALS:
        return 401, "", "WPT"
    if scheme == SCHEME_WIT:
        return 400, "invalid_token", ""
    if scheme == SCHEME_WPT_01:
        return 400, "invalid_proof", ""
    return 401, "invalid_proof", f'WPT error="invalid_proof", error_description="{description}"'
