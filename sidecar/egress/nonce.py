"""DPoP nonces on the egress side (RFC 9449 §9), sans-IO.

A resource server that wants nonces answers ``401`` with
``WWW-Authenticate: DPoP error="use_dpop_nonce"`` and ``DPoP-Nonce: <nonce>``; it may also offer
a fresh ``DPoP-Nonce`` on any other response (§9: "the resource server ... MAY provide a new
nonce in any response"). We keep the latest nonce per upstream ORIGIN and put it in the next
proof to that origin; on the challenge the proxy retries once (if the body can be replayed).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_SEP = re.compile(r"[\s,]*")
_SCHEME = re.compile(_TOKEN)
_PARAM = re.compile(rf'\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|{_TOKEN})\s*')
_TOKEN68 = re.compile(r"\s+[A-Za-z0-9\-._~+/]+=*\s*(?=,|$)")
_NONCE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,512}$")  # §8.1 NQCHAR


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return re.sub(r"\\(.)", r"\1", raw[1:-1])
    return raw


def parse_challenges(value: str) -> list[tuple[str, dict[str, str]]]:
    """RFC 9110 §11.6.1 challenges in one ``WWW-Authenticate`` value: [(scheme, params)].
    Scheme names keep their case; parameter names are lower-cased. Garbage ends parsing."""
    out: list[tuple[str, dict[str, str]]] = []
    pos, end = 0, len(value)
    current: dict[str, str] | None = None
    while pos < end:
        pos = _SEP.match(value, pos).end()  # type: ignore[union-attr]
        if pos >= end:
            break
        param = _PARAM.match(value, pos)
        if param is not None and current is not None:
            current[param.group(1).lower()] = _unquote(param.group(2))
            pos = param.end()
            continue
        scheme = _SCHEME.match(value, pos)
        if scheme is None:
            break
        current = {}
        out.append((scheme.group(0), current))
        pos = scheme.end()
        if _PARAM.match(value, pos) is None:
            token68 = _TOKEN68.match(value, pos)
            if token68 is not None:
                pos = token68.end()
    return out


def dpop_error(www_authenticate: Iterable[str]) -> str | None:
    """The ``error`` of the first DPoP challenge that has one (RFC 9449 §7.1), or None."""
    for value in www_authenticate:
        for scheme, params in parse_challenges(value):
            error = params.get("error")
            if scheme.lower() == "dpop" and error is not None:
                return error
    return None


def is_use_dpop_nonce(www_authenticate: Iterable[str]) -> bool:
    """True if a DPoP challenge says ``error="use_dpop_nonce"``."""
    return any(
        scheme.lower() == "dpop" and params.get("error") == "use_dpop_nonce"
        for value in www_authenticate
        for scheme, params in parse_challenges(value)
    )


def valid_nonce(value: str | None) -> str | None:
    return value if value is not None and _NONCE.match(value) else None


class NonceCache:
    """The latest nonce per origin; bounded (least recently updated evicted first)."""

    def __init__(self, capacity: int = 1024) -> None:
        self._capacity = capacity
        self._nonces: OrderedDict[str, str] = OrderedDict()

    def get(self, origin: str) -> str | None:
        return self._nonces.get(origin)

    def offer(self, origin: str, nonce: str | None) -> bool:
        """Remember ``nonce`` (if well formed) for ``origin``; True if it was new."""
        nonce = valid_nonce(nonce)
        if nonce is None or self._nonces.get(origin) == nonce:
            return False
        self._nonces[origin] = nonce
        self._nonces.move_to_end(origin)
        if len(self._nonces) > self._capacity:
            self._nonces.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._nonces)
