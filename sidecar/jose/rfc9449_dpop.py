"""DPoP proofs (RFC 9449): verification per §4.3 and creation per §4.2.

The check list of §4.3 is followed step by step; the step number is cited above each check.
Step 1 (at most one DPoP header) needs the raw header list and is done by the caller.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from sidecar.errors import AuthError, Reason
from sidecar.jose.b64 import b64url_decode, b64url_encode
from sidecar.jose.claim_text import acceptable_text
from sidecar.jose.rfc7515_jws import JWSFormatError, normalize_typ, strict_json_object
from sidecar.jose.rfc7517_jwk import JWKError, PublicJWK, import_public_jwk, public_jwk_dict
from sidecar.jose.rfc7518_algorithms import ASYMMETRIC_ALGORITHMS, sign, verify_signature
from sidecar.jose.rfc7638_thumbprint import jwk_thumbprint

MAX_JTI = 256
MAX_HTU = 4096
MAX_NONCE = 512
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: host[:port] (RFC 3986 §3.2.2-3): no '/', '?' or '#', which would end the authority of a URL
#: built from it and move the request's path into a query or fragment, and no '@' (userinfo).
_AUTHORITY = re.compile(r"[A-Za-z0-9._~%!$&'()*+,;=:\[\]-]+")


def proof_htu(url: str) -> str:
    """The ``htu`` a client puts in a proof (§4.2): the target URI without query and
    fragment."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path or '/'}"


def access_token_hash(token: str) -> str:
    """``ath`` (RFC 9449 §4.2): base64url SHA-256 of the ASCII access token."""
    return b64url_encode(hashlib.sha256(token.encode("ascii", "replace")).digest())


# A client sends one token with many proofs; tokens are a few KiB each: ~1 MiB at worst.
_cached_ath = functools.lru_cache(maxsize=256)(access_token_hash)


def _normalize_pct(match: re.Match[str]) -> str:
    byte = int(match.group(1), 16)
    return chr(byte) if byte in _UNRESERVED else "%" + match.group(1).upper()


def is_authority(host: str) -> bool:
    """Whether a client's ``Host`` can stand as the authority of the URL a proof's ``htu`` is
    compared with (RFC 9449 §4.3 step 9): ``orders?`` would turn the real path into a query."""
    return _AUTHORITY.fullmatch(host) is not None


def normalize_htu(url: str) -> str:
    """The comparable form of an HTTP URI (RFC 9449 §4.3 step 9 with RFC 3986 §6.2.2/§6.2.3).

    Lower-cases scheme and host, drops the default port, the query and the fragment, maps an
    empty path to "/", and normalizes percent-encoding. Raises ValueError if not http(s).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError("not an absolute http(s) URI")
    if parts.username is not None or parts.password is not None:
        raise ValueError("userinfo is not allowed in an http(s) URI (RFC 9110 §4.2.4)")
    host = parts.hostname.lower()  # urlsplit already strips brackets from IPv6
    if ":" in host:
        host = f"[{host}]"
    port = parts.port  # ValueError for a bad port
    authority = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = _PCT.sub(_normalize_pct, parts.path) or "/"
    return f"{scheme}://{authority}{path}"


class VerifiedProof(NamedTuple):  # built per DPoP check: cheaper than a dataclass
    jkt: str
    jti: str
    htm: str
    htu: str
    iat: float
    nonce: str | None
    #: The proof's key and algorithm: what a WIT's ``cnf.jwk`` confirms when one is issued.
    key: PublicJWK | None = None
    alg: str | None = None


#: The proof algorithms accepted unless configured otherwise (ingress and broker alike).
DEFAULT_PROOF_ALGORITHMS = ("ES256", "ES384", "Ed25519", "EdDSA", "PS256", "RS256")


@dataclass(frozen=True, slots=True)
class DPoPPolicy:
    """When a proof is acceptable, and for how long it must be remembered: one policy for the
    ingress and the broker so the two can never drift apart."""

    algorithms: frozenset[str] = frozenset(DEFAULT_PROOF_ALGORITHMS)
    max_age: float = 60.0  # how old iat may be
    future_leeway: float = 5.0  # how far ahead of our clock iat may be
    max_bytes: int = 4096

    @property
    def replay_ttl(self) -> float:
        """How long a used proof's key is remembered. A proof accepted at t may carry iat up to
        t + future_leeway and stays acceptable until iat + max_age inclusive; the replay store
        forgets an entry at exactly its expiry, so one more second covers that instant."""
        return self.max_age + self.future_leeway + 1.0

    def predates(self, iat: float, epoch: float) -> bool:
        """Could a proof with this ``iat`` have been accepted before ``epoch`` (when a replay
        store started remembering)? It is accepted from ``iat - future_leeway`` on."""
        return iat <= epoch + self.future_leeway

    def passes_after(self, epoch: float) -> float:
        """When a proof signed then no longer :meth:`predates` ``epoch`` (whole-second iat)."""
        return epoch + self.future_leeway + 1.0

    @staticmethod
    def replay_key(proof: VerifiedProof) -> str:
        """§11.1: a jti is unique per key, so two clients may pick the same one."""
        return f"{proof.jkt}:{proof.jti}"


class ProofKeyCache:
    """Bounded cache of validated proof headers. One client signs every proof with the same
    key, so its header segment is byte-identical each time: decoding it, importing the JWK and
    hashing its thumbprint happen once per client instead of once per request."""

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._headers: OrderedDict[str, tuple[str, PublicJWK]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._headers)

    def header(self, h64: str, expected_jkt: str | None = None) -> tuple[str, PublicJWK]:
        """(alg, key) for a proof's header segment, validated per §4.3 steps 4, 5 and 7. A key
        that is not ``expected_jkt`` is refused before it is imported (that is the costly
        part: EC point and Ed25519 checks); the caller still compares it on a cache hit."""
        cached = self._headers.get(h64)
        if cached is not None:
            self._headers.move_to_end(h64)
            return cached
        try:
            header = strict_json_object(b64url_decode(h64), "proof header")
        except (ValueError, JWSFormatError) as exc:
            raise AuthError(Reason.PROOF_INVALID, f"proof header: {exc}") from None
        if "crit" in header:
            raise AuthError(Reason.PROOF_INVALID, "proof has unsupported critical headers")
        # Step 4: typ is dpop+jwt (or application/dpop+jwt, in any case: RFC 7515 §4.1.9).
        typ = header.get("typ")
        if not isinstance(typ, str) or normalize_typ(typ) != "dpop+jwt":
            raise AuthError(Reason.PROOF_INVALID, "proof typ is not dpop+jwt")
        # Step 5: an asymmetric algorithm (never none or MAC).
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
            raise AuthError(Reason.PROOF_INVALID, "proof alg is not an asymmetric algorithm")
        # Step 7: the jwk is a public key (private members are refused by the import).
        jwk = header.get("jwk")
        if not isinstance(jwk, dict):
            raise AuthError(Reason.PROOF_INVALID, "proof has no jwk header")
        if expected_jkt is not None:
            try:
                bound = secrets.compare_digest(jwk_thumbprint(jwk), expected_jkt)
            except ValueError:
                raise AuthError(Reason.PROOF_INVALID, "proof jwk is incomplete") from None
            if not bound:
                raise AuthError(Reason.PROOF_KEY_MISMATCH, "proof key is not the token's cnf.jkt")
        try:
            key = import_public_jwk(jwk)
        except JWKError as exc:
            raise AuthError(Reason.PROOF_INVALID, f"proof jwk: {exc}") from None
        if not key.usable_with(alg):
            raise AuthError(Reason.PROOF_INVALID, "proof jwk does not fit its alg")
        entry = (alg, key)
        self._headers[h64] = entry
        if len(self._headers) > self._capacity:
            self._headers.popitem(last=False)
        return entry


_HTU_CACHE: dict[str, str] = {}
_HTU_CACHE_MAX = 4096


def _normalized(url: str) -> str:
    """normalize_htu with a bounded memo: clients repeat the same few URLs."""
    hit = _HTU_CACHE.get(url)
    if hit is None:
        hit = normalize_htu(url)  # ValueError propagates, nothing cached
        if len(_HTU_CACHE) >= _HTU_CACHE_MAX:
            _HTU_CACHE.clear()
        _HTU_CACHE[url] = hit
    return hit


def _check_htu(htu: str, url: str) -> None:
    try:
        same = _normalized(htu) == _normalized(url)
    except ValueError:
        raise AuthError(Reason.HTU_MISMATCH, "proof htu is not a valid http(s) URI") from None
    if not same:
        raise AuthError(Reason.HTU_MISMATCH, "proof htu does not match the request URI")


def split_proof(token: str, max_bytes: int, what: str) -> tuple[str, str, str]:
    """A per-request proof (DPoP proof, WIMSE WPT) as its three compact-JWS parts, after the
    cheap checks every proof gets first: bounded size, ASCII, header and payload present."""
    if len(token) > max_bytes:
        raise AuthError(Reason.PROOF_INVALID, f"{what} longer than {max_bytes} bytes")
    if not token.isascii():
        raise AuthError(Reason.PROOF_INVALID, f"{what} is not ASCII")
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise AuthError(Reason.PROOF_INVALID, f"{what} is not a compact JWS")
    return parts[0], parts[1], parts[2]


def verify_proof(
    proof: str,
    *,
    method: str,
    url: str,
    access_token: str | None,
    expected_jkt: str | None,
    now: float,
    policy: DPoPPolicy,
    key_cache: ProofKeyCache,
    check_htu: Callable[[str], None] | None = None,
) -> VerifiedProof:
    """Verify a DPoP proof for one request; raise AuthError with the precise reason.

    ``check_htu`` replaces the plain comparison of step 9 (``htu`` equals ``url`` once both are
    normalized) with the caller's own, which raises AuthError: the ingress knows what its proxy
    forwards and which origins it answers to (``sidecar.authz.target``).

    Cheap before expensive: structure, the (cached) header and key, the binding to the
    token's ``cnf.jkt``, every claim, and only then the signature, so a proof that would be
    refused anyway never costs a public-key operation (§4.3 lists the checks, not an order).
    """
    # Step 2: a single well-formed compact JWT.
    h64, p64, s64 = split_proof(proof, policy.max_bytes, "proof")
    alg, key = key_cache.header(h64, expected_jkt)  # steps 4, 5, 7 (and the key's strength)
    if alg not in policy.algorithms:
        raise AuthError(Reason.PROOF_INVALID, "proof alg is not allowed")
    # Step 12 (key part): the proof key is the one the token is bound to.
    if expected_jkt is not None and not secrets.compare_digest(key.thumbprint, expected_jkt):
        raise AuthError(Reason.PROOF_KEY_MISMATCH, "proof key is not the token's cnf.jkt")
    try:
        signature = b64url_decode(s64)
    except ValueError:
        raise AuthError(Reason.PROOF_INVALID, "proof signature is not base64url") from None
    try:
        claims = strict_json_object(b64url_decode(p64), "proof payload")
    except (ValueError, JWSFormatError) as exc:
        raise AuthError(Reason.PROOF_INVALID, f"proof payload: {exc}") from None
    # Step 3: the required claims, with the right types.
    get = claims.get
    jti, htm, htu, iat, nonce = get("jti"), get("htm"), get("htu"), get("iat"), get("nonce")
    if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI:
        raise AuthError(Reason.PROOF_INVALID, "proof jti missing or too long")
    if not isinstance(htm, str) or not isinstance(htu, str) or len(htu) > MAX_HTU:
        raise AuthError(Reason.PROOF_INVALID, "proof htm/htu missing")
    if isinstance(iat, bool) or not isinstance(iat, int | float) or iat != iat:
        raise AuthError(Reason.PROOF_INVALID, "proof iat is not a NumericDate")
    if nonce is not None and (not isinstance(nonce, str) or len(nonce) > MAX_NONCE):
        raise AuthError(Reason.PROOF_INVALID, "proof nonce is not a string")
    # The jti becomes part of the replay key and of log lines: printable ASCII only (and so
    # are htm, htu and nonce: no honest client puts anything else there).
    if not (
        acceptable_text(jti)
        and acceptable_text(htm)
        and acceptable_text(htu)
        and (nonce is None or acceptable_text(nonce))
    ):
        raise AuthError(Reason.PROOF_INVALID, "proof claim is not printable ASCII")
    # Step 8: htm matches the request method (case-sensitive, RFC 9110 §9.1).
    if htm != method:
        raise AuthError(Reason.HTM_MISMATCH, "proof htm does not match the request method")
    # Step 9: htu matches the target URI, ignoring query and fragment.
    if check_htu is not None:
        check_htu(htu)
    else:
        _check_htu(htu, url)
    # Step 11: iat within the acceptance window (nonce freshness is the caller's: step 10).
    if not now - policy.max_age <= iat <= now + policy.future_leeway:
        raise AuthError(Reason.IAT_OUT_OF_WINDOW, "proof iat is outside the acceptance window")
    # Step 12: bound to the access token presented with it.
    if access_token is not None:
        ath = claims.get("ath")
        if not isinstance(ath, str) or not ath.isascii():
            raise AuthError(Reason.ATH_MISMATCH, "proof has no ath for the access token")
        if not secrets.compare_digest(ath, _cached_ath(access_token)):
            raise AuthError(Reason.ATH_MISMATCH, "proof ath does not match the access token")
    # Step 6, last: the signature verifies with the key in the header.
    signing_input = proof[: len(h64) + 1 + len(p64)].encode("ascii")
    if not verify_signature(alg, key.key, signing_input, signature):
        raise AuthError(Reason.PROOF_INVALID, "proof signature does not verify")
    return VerifiedProof(
        jkt=key.thumbprint, jti=jti, htm=htm, htu=htu, iat=float(iat), nonce=nonce, key=key, alg=alg
    )


class ProofSigner:
    """Creates DPoP proofs with one private key (RFC 9449 §4.2). The header is fixed per
    key, so its encoding is computed once."""

    def __init__(self, private_key: Any, alg: str = "ES256") -> None:
        self._key = private_key
        self.alg = alg
        self.public_jwk = public_jwk_dict(private_key)
        self.thumbprint = jwk_thumbprint(self.public_jwk)
        header = {"typ": "dpop+jwt", "alg": alg, "jwk": self.public_jwk}
        self._header64 = b64url_encode(json.dumps(header, separators=(",", ":")).encode())

    def proof(
        self,
        *,
        method: str,
        url: str,
        now: float,
        access_token: str | None = None,
        nonce: str | None = None,
        jti: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        claims: dict[str, Any] = {
            "jti": jti or secrets.token_urlsafe(16),  # 128 random bits (§4.2 / §11.1)
            "htm": method,
            "htu": proof_htu(url),
            "iat": int(now),
        }
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        if nonce is not None:
            claims["nonce"] = nonce
        if extra:
            claims.update(extra)
        payload64 = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{self._header64}.{payload64}".encode("ascii")
        signature = b64url_encode(sign(self.alg, self._key, signing_input))
        return f"{self._header64}.{payload64}.{signature}"
