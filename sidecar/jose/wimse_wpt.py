"""WIMSE Workload Proof Tokens (draft-ietf-wimse-wpt-01 §3; -02 carriage): creation and
verification.

A WPT proves, per request, possession of the key a WIT (``wimse_wit``) confirms: it is signed
with that key, names the target (``aud``), is bound to the WIT (``wth``) and to any other token
sent with it (``ath``, ``tth``, ``oth``), expires within seconds, and its ``jti`` is used once.

Carriage: -01 sends it in ``Workload-Proof-Token``; -02 in ``Authorization: WPT <jwt>``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from sidecar.errors import AuthError, Reason
from sidecar.jose.b64 import b64url_decode, b64url_encode
from sidecar.jose.claim_text import acceptable_text
from sidecar.jose.rfc7515_jws import JWSFormatError, normalize_typ, strict_json_object
from sidecar.jose.rfc7518_algorithms import sign, verify_signature
from sidecar.jose.rfc9449_dpop import normalize_htu, proof_htu, split_proof
from sidecar.jose.wimse_wit import VerifiedWIT, jws_algorithm, token_hash

WPT_TYP = "wpt+jwt"
#: -01 carriage; -02 uses ``Authorization`` with this scheme.
WPT_HEADER = "workload-proof-token"
WPT_SCHEME = "WPT"
TXN_TOKEN_HEADER = "txn-token"
MAX_JTI = 256
MAX_AUD = 4096
MAX_OTH = 8


@dataclass(frozen=True, slots=True)
class WptPolicy:
    #: How far ahead of our clock ``exp`` may be: a WPT lives seconds to minutes (-01 §3).
    max_lifetime: float = 300.0
    leeway: float = 5.0
    max_bytes: int = 4096
    #: ``oth`` entries (lower-case header names) this verifier understands; any other entry
    #: rejects the WPT (-01 §3, "oth").
    other_tokens: frozenset[str] = frozenset()

    def usable_from(self, exp: float, iat: float | None) -> float:
        """The earliest instant this verifier could have accepted a WPT (for the restart
        guard): from its ``iat`` when it has one (one in the future is refused), else as long
        before ``exp`` as the longest lifetime accepted."""
        earliest = exp - self.max_lifetime - self.leeway
        return earliest if iat is None else max(earliest, iat - self.leeway)

    @property
    def replay_ttl(self) -> float:
        """A WPT accepted now passes until at most now + max_lifetime + leeway; remember its
        jti that long (one more second for the store's expiry instant)."""
        return self.max_lifetime + self.leeway + 1.0


@dataclass(frozen=True, slots=True)
class VerifiedWPT:
    jti: str
    aud: str
    exp: float
    #: The replay key: a jti is unique per sender (its WIT key), so two workloads may pick
    #: the same one.
    replay_key: str
    #: Not in the drafts' claim set; ours carry it so that a restarted verifier knows the WPT
    #: is new (see ``WptPolicy.usable_from``).
    iat: float | None = None


def _same_uri(expected: str) -> Callable[[str], None]:
    def check(aud: str) -> None:
        try:
            same = normalize_htu(aud) == normalize_htu(expected)
        except ValueError:
            raise AuthError(Reason.HTU_MISMATCH, "WPT aud is not an http(s) URI") from None
        if not same:
            raise AuthError(Reason.HTU_MISMATCH, "WPT aud is not this target")

    return check


def verify_wpt(
    wpt: str,
    *,
    wit: VerifiedWIT,
    now: float,
    policy: WptPolicy,
    check_aud: Callable[[str], None] | None = None,
    url: str = "",
    access_token: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> VerifiedWPT:
    """Verify a WPT for a request whose WIT is already verified; raise AuthError.

    ``check_aud`` raises AuthError unless ``aud`` names this service's target (the ingress
    checks it against ``authz.authorities``, never ``Host``); without it ``aud`` must equal
    ``url``. ``headers`` are the request's (lower-case names), for ``tth`` and ``oth``.
    """
    headers = headers or {}
    h64, p64, s64 = split_proof(wpt, policy.max_bytes, "WPT")
    try:
        header = strict_json_object(b64url_decode(h64), "WPT header")
        claims = strict_json_object(b64url_decode(p64), "WPT payload")
        signature = b64url_decode(s64)
    except (ValueError, JWSFormatError) as exc:
        raise AuthError(Reason.PROOF_INVALID, f"WPT: {exc}") from None
    if "crit" in header:
        raise AuthError(Reason.PROOF_INVALID, "WPT has unsupported critical headers")
    typ = header.get("typ")
    if not isinstance(typ, str) or normalize_typ(typ) != WPT_TYP:
        raise AuthError(Reason.PROOF_INVALID, "WPT typ is not wpt+jwt")
    # -01 §3: the alg MUST be the WIT's cnf.jwk.alg (no downgrade to another algorithm).
    if header.get("alg") != wit.key_alg:
        raise AuthError(Reason.PROOF_KEY_MISMATCH, "WPT alg is not the WIT's cnf.jwk alg")
    jti, aud, exp = claims.get("jti"), claims.get("aud"), claims.get("exp")
    if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI or not acceptable_text(jti):
        raise AuthError(Reason.PROOF_INVALID, "WPT jti missing, too long or not printable")
    if not isinstance(aud, str) or not 0 < len(aud) <= MAX_AUD or not acceptable_text(aud):
        raise AuthError(Reason.PROOF_INVALID, "WPT aud missing or not a URI")
    if not _numeric_date(exp):
        raise AuthError(Reason.PROOF_INVALID, "WPT exp is not a NumericDate")
    (check_aud or _same_uri(url))(aud)
    if now >= exp + policy.leeway:
        raise AuthError(Reason.IAT_OUT_OF_WINDOW, "WPT has expired")
    if exp > now + policy.max_lifetime + policy.leeway:
        raise AuthError(Reason.IAT_OUT_OF_WINDOW, "WPT exp is too far ahead")
    iat = claims.get("iat")
    if iat is not None:
        if not _numeric_date(iat):
            raise AuthError(Reason.PROOF_INVALID, "WPT iat is not a NumericDate")
        if iat > now + policy.leeway:
            raise AuthError(Reason.IAT_OUT_OF_WINDOW, "WPT iat is in the future")
        if iat > exp:
            raise AuthError(Reason.PROOF_INVALID, "WPT iat is after its exp")
    # wth binds the proof to the WIT sent with it: a WPT for one WIT is useless with another.
    wth = claims.get("wth")
    if not isinstance(wth, str) or not secrets.compare_digest(wth.encode(), wit.wth.encode()):
        raise AuthError(Reason.PROOF_KEY_MISMATCH, "WPT wth does not match the WIT")
    _check_hash(claims.get("ath"), access_token, "ath")
    _check_hash(claims.get("tth"), headers.get(TXN_TOKEN_HEADER), "tth")
    _check_other_tokens(claims.get("oth"), headers, policy.other_tokens)
    signing_input = wpt[: len(h64) + 1 + len(p64)].encode("ascii")
    if not verify_signature(jws_algorithm(wit.key_alg), wit.key.key, signing_input, signature):
        raise AuthError(Reason.PROOF_INVALID, "WPT signature does not verify with cnf.jwk")
    return VerifiedWPT(
        jti=jti,
        aud=aud,
        exp=float(exp),
        replay_key=f"wpt:{wit.key.thumbprint}:{jti}",
        iat=None if iat is None else float(iat),
    )


def _numeric_date(value: Any) -> TypeGuard[int | float]:
    """A JSON number within ±1e12 s: bool is an int subclass, and NaN or a huge integer
    would compare wrongly or overflow later."""
    return not isinstance(value, bool) and isinstance(value, int | float) and -1e12 < value < 1e12


def _check_hash(claimed: Any, token: str | None, name: str) -> None:
    """A token sent with the WPT must be covered by its hash claim, and a hash claim must
    name a token that was sent (so a proof cannot be moved to a request with other tokens)."""
    if token is None and claimed is None:
        return
    if token is None:
        raise AuthError(Reason.ATH_MISMATCH, f"WPT has {name} but no such token was sent")
    if not isinstance(claimed, str):
        raise AuthError(Reason.ATH_MISMATCH, f"WPT has no {name} for the token sent with it")
    if not secrets.compare_digest(claimed.encode(), token_hash(token.strip()).encode()):
        raise AuthError(Reason.ATH_MISMATCH, f"WPT {name} does not match the token")


def _check_other_tokens(oth: Any, headers: Mapping[str, str], understood: frozenset[str]) -> None:
    if oth is None:
        return
    if not isinstance(oth, dict) or len(oth) > MAX_OTH:
        raise AuthError(Reason.PROOF_INVALID, "WPT oth is not a small object")
    for name, claimed in oth.items():
        # -01 §3: an oth entry the recipient does not understand rejects the WPT.
        if name not in understood:
            raise AuthError(Reason.PROOF_INVALID, "WPT oth names a token not understood here")
        _check_hash(claimed, headers.get(name), "oth")


class WptSigner:
    """Creates WPTs with the workload's private key (the key its WIT's ``cnf.jwk`` names)."""

    def __init__(self, private_key: Any, alg: str) -> None:
        self._key = private_key
        self.alg = alg
        header = {"alg": alg, "typ": WPT_TYP}
        self._header64 = b64url_encode(json.dumps(header, separators=(",", ":")).encode())

    def proof(
        self,
        *,
        url: str,
        wit: str,
        now: float,
        lifetime: float = 30.0,
        access_token: str | None = None,
        txn_token: str | None = None,
        other_tokens: Mapping[str, str] | None = None,
        jti: str | None = None,
        exp: int | None = None,
        with_iat: bool = True,
    ) -> str:
        """``with_iat``: add ``iat`` (a JWT claim the drafts do not list; a verifier that does
        not know it ignores it). Without it a restarted verifier of ours must assume the WPT
        may be as old as its longest accepted lifetime."""
        claims: dict[str, Any] = {
            "aud": proof_htu(url),  # the target URI without query and fragment
            "exp": int(now + lifetime) if exp is None else exp,
            "jti": jti or secrets.token_urlsafe(16),  # 128 random bits
            "wth": token_hash(wit),
        }
        if with_iat:
            claims["iat"] = int(now)
        if access_token is not None:
            claims["ath"] = token_hash(access_token)
        if txn_token is not None:
            claims["tth"] = token_hash(txn_token.strip())
        if other_tokens:
            claims["oth"] = {
                name.lower(): token_hash(value.strip()) for name, value in other_tokens.items()
            }
        # Sorted members: the encoding the drafts' examples use, so theirs can be reproduced.
        payload = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
        signing_input = f"{self._header64}.{b64url_encode(payload)}"
        signature = sign(jws_algorithm(self.alg), self._key, signing_input.encode("ascii"))
        return f"{signing_input}.{b64url_encode(signature)}"
