"""Egress ``auth: wimse``: a WIT and a fresh WPT on every forwarded request
(draft-ietf-wimse-workload-creds-02 §4.1, draft-ietf-wimse-wpt-01 §3 / -02 carriage).

* The WIT comes from the token source like an access token (slot
  :data:`~sidecar.identity.rfc8693_exchange.WIT_AUDIENCE`: fetched after the same attestation,
  bound to the sidecar's in-memory key, refreshed out of band). It is sent in
  ``Workload-Identity-Token``.
* The WPT is signed per request with that same key: ``aud`` the target URI (no query or
  fragment), ``wth`` over the WIT, ``exp`` ``proof_lifetime`` seconds ahead, a 128-bit ``jti``,
  ``tth`` over a ``Txn-Token`` and ``oth`` over the headers named in ``other_tokens`` when the
  app sent them. It goes in ``Authorization: WPT`` (-02, default) or ``Workload-Proof-Token``
  (-01).
* Whatever ``Authorization``, ``DPoP``, ``Workload-Identity-Token`` or ``Workload-Proof-Token``
  the app sent is removed first: the app never supplies the workload's credentials.

Per upstream::

    - name: orders
      listen: 127.0.0.1:15002
      upstream: http://127.0.0.1:10000
      auth: wimse                          # token (default) | wimse
      wimse:
        proof_header: authorization        # authorization (-02) | workload-proof-token (-01)
        proof_lifetime: 30                 # seconds: the WPT's exp ahead of now
        other_tokens: [x-partner-token]    # app headers forwarded and covered by oth
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from sidecar.config_util import get_choice, get_duration, get_str_list, known_keys, section
from sidecar.errors import ConfigError
from sidecar.jose.wimse_wit import WIT_HEADER
from sidecar.jose.wimse_wpt import MAX_OTH, TXN_TOKEN_HEADER, WPT_HEADER, WPT_SCHEME, WptSigner

AUTH_MODES = ("token", "wimse")
PROOF_HEADERS = ("authorization", WPT_HEADER)
#: Attestors that can ask the broker for a WIT bound to our key.
WIT_ATTESTORS = ("unix", "k8s")
#: What the app may not supply on a WIMSE upstream: the workload's credentials are ours.
STRIPPED = frozenset({"authorization", "dpop", WIT_HEADER, WPT_HEADER})
_TOKEN_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]{1,64}$")  # RFC 9110 token, lower case
#: Headers that carry proof-of-possession machinery or hop state, never an "other token".
_NOT_OTHER = STRIPPED | {TXN_TOKEN_HEADER, "host", "cookie", "content-length"}


@dataclass(frozen=True, slots=True)
class WimseUpstream:
    #: ``authorization`` (-02: ``Authorization: WPT <jwt>``) or ``workload-proof-token`` (-01).
    proof_header: str = "authorization"
    proof_lifetime: float = 30.0
    #: Lower-case header names whose values, when the app sends them, the WPT covers (``oth``).
    other_tokens: tuple[str, ...] = ()


def parse_upstream_auth(item: Mapping[str, Any], key: str) -> WimseUpstream | None:
    """``auth`` and ``wimse`` of one upstream or forward-proxy destination: None for
    ``auth: token`` (the access token of ``audience``)."""
    auth = get_choice(item, "auth", key, AUTH_MODES, "token")
    if auth != "wimse":
        if "wimse" in item:
            raise ConfigError(
                f"{key}.wimse", "only with auth: wimse (set auth: wimse or remove it)"
            )
        return None
    for name, why in (
        ("audience", "a WIT has no audience: remove it, or use auth: token for an access token"),
        (
            "on_existing_authorization",
            "nothing: with auth: wimse the app's own credentials are always removed",
        ),
    ):
        if name in item:
            raise ConfigError(f"{key}.{name}", why, item[name])
    wkey = f"{key}.wimse"
    raw = section(item.get("wimse"), wkey)
    known_keys(raw, wkey, {"proof_header", "proof_lifetime", "other_tokens"})
    names = [n.lower() for n in get_str_list(raw, "other_tokens", wkey, [])]
    for name in names:
        if not _TOKEN_NAME.match(name) or name in _NOT_OTHER:
            raise ConfigError(
                f"{wkey}.other_tokens",
                "header names of tokens the app sends (not Authorization, DPoP, the WIMSE "
                "headers, Txn-Token — covered by tth — Host, Cookie or Content-Length)",
                name,
            )
    if len(set(names)) > MAX_OTH:
        raise ConfigError(f"{wkey}.other_tokens", f"at most {MAX_OTH} names", names)
    lifetime = get_duration(raw, "proof_lifetime", wkey, 30.0, minimum=1.0)
    if lifetime > 300:
        # A receiver refuses a WPT whose exp is further ahead than its max_proof_lifetime
        # (300 s by default): a longer one only widens the replay window.
        raise ConfigError(f"{wkey}.proof_lifetime", "at most 300 seconds", lifetime)
    return WimseUpstream(
        proof_header=get_choice(raw, "proof_header", wkey, PROOF_HEADERS, "authorization"),
        proof_lifetime=lifetime,
        other_tokens=tuple(dict.fromkeys(names)),
    )


def check_attestor(wimse_keys: Iterable[str], attestor_kind: str) -> None:
    """A WIMSE upstream needs an attestor that obtains WITs (``unix``, ``k8s``)."""
    for key in wimse_keys:
        if attestor_kind not in WIT_ATTESTORS:
            raise ConfigError(
                f"{key}.auth",
                f"identity.attestor.type unix or k8s for auth: wimse (the {attestor_kind} "
                "attestor cannot obtain a WIT bound to the sidecar's key)",
                "wimse",
            )


def add_credentials(
    headers: MutableMapping[str, str],
    *,
    settings: WimseUpstream,
    signer: WptSigner,
    wit: str,
    url: str,
    now: float,
) -> None:
    """Set the WIT and a fresh WPT for ``url`` on the outgoing ``headers`` (which no longer
    hold anything the app sent in :data:`STRIPPED`)."""
    others = {name: headers[name] for name in settings.other_tokens if name in headers}
    proof = signer.proof(
        url=url,
        wit=wit,
        now=now,
        lifetime=settings.proof_lifetime,
        txn_token=headers.get(TXN_TOKEN_HEADER),
        other_tokens=others or None,
    )
    headers["Workload-Identity-Token"] = wit
    if settings.proof_header == WPT_HEADER:
        headers["Workload-Proof-Token"] = proof
    else:
        headers["Authorization"] = f"{WPT_SCHEME} {proof}"
