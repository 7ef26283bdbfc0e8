"""JWS Compact Serialization (RFC 7515 §7.1), parsed strictly and with size limits.

RFC 8725 §3.1/§3.11 and RFC 7515 §4.1.11: the JSON Serialization is never accepted here,
duplicate header parameters are refused (§4: "MUST reject ... or use a JSON parser that
returns only the lexically last"; we reject), and ``crit`` listing anything is refused because
we understand no extension.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sidecar.errors import SidecarError
from sidecar.jose.b64 import b64url_decode, b64url_encode


class JWSFormatError(SidecarError, ValueError):
    """The text is not a well-formed compact JWS."""

    code = "jws_malformed"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JWSFormatError(f"duplicate member {key!r}")
            seen.add(key)
    return out


def _no_constants(name: str) -> Any:
    raise JWSFormatError(f"non-standard JSON constant {name}")


# One decoder for every parse: json.loads with hooks would build a new one per call.
_STRICT_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def strict_json_object(data: bytes, what: str) -> dict[str, Any]:
    """Parse UTF-8 JSON that must be an object, with no duplicate members and no NaN."""
    try:
        value = _STRICT_DECODER.decode(data.decode("utf-8"))
    except JWSFormatError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise JWSFormatError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise JWSFormatError(f"{what} is not a JSON object")
    return value


def normalize_typ(typ: str) -> str:
    """The comparable form of a ``typ`` header (RFC 7515 §4.1.9): media types compare
    case-insensitively and "application/" is implied when there is no "/", so
    ``application/DPoP+JWT`` and ``dpop+jwt`` are both ``dpop+jwt``. Access-token and proof
    ``typ`` checks use this one function."""
    typ = typ.lower()
    return typ[len("application/") :] if typ.startswith("application/") else typ


@dataclass(frozen=True, slots=True)
class CompactJWS:
    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes


def parse_compact(token: str, *, max_bytes: int) -> CompactJWS:
    """Split and decode ``header.payload.signature``; the payload must be a JSON object."""
    if len(token) > max_bytes:
        raise JWSFormatError(f"longer than {max_bytes} bytes")
    if not token.isascii():
        raise JWSFormatError("not ASCII")
    parts = token.split(".")
    if len(parts) != 3:
        raise JWSFormatError("not three dot-separated parts (compact JWS only)")
    h64, p64, s64 = parts
    if not h64 or not p64:
        # An empty signature is let through to the algorithm check so that an unsecured JWT
        # (RFC 7519 §6, alg "none") is reported as a refused algorithm, not as garbage.
        raise JWSFormatError("empty header or payload")
    try:
        header_raw = b64url_decode(h64)
        payload_raw = b64url_decode(p64)
        signature = b64url_decode(s64)
    except ValueError:
        raise JWSFormatError("a part is not base64url") from None
    header = strict_json_object(header_raw, "header")
    if "crit" in header:
        raise JWSFormatError("unsupported critical header parameters")
    if not isinstance(header.get("alg"), str):
        raise JWSFormatError("header has no alg")
    payload = strict_json_object(payload_raw, "payload")
    return CompactJWS(
        header=header,
        payload=payload,
        signing_input=f"{h64}.{p64}".encode("ascii"),
        signature=signature,
    )


def sign_compact(
    private_key: Any, alg: str, claims: dict[str, Any], *, header: dict[str, Any] | None = None
) -> str:
    """Create a compact JWS over a JSON claims set (the broker's tokens, tests' fixtures)."""
    from sidecar.jose.rfc7518_algorithms import sign

    hdr = {"alg": alg, **(header or {})}
    h64 = b64url_encode(json.dumps(hdr, separators=(",", ":")).encode())
    p64 = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{h64}.{p64}".encode("ascii")
    return f"{h64}.{p64}.{b64url_encode(sign(alg, private_key, signing_input))}"
