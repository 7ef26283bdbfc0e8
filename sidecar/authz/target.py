"""The target URI a DPoP proof's ``htu`` must name, as the ingress sees it (RFC 9449 §4.3 step 9).

Two rules on top of the plain comparison of normalized URIs:

* **Authorities.** ``authz.authorities`` lists the origins (``scheme://host[:port]``) this
  service answers to, from trusted configuration. When set, the request's own origin (the
  client's ``Host`` and the connection's scheme) is not used at all: the ``htu`` origin must be
  one of the authorities and its path must be the request's path. The same normalized origins
  are meant to serve WIMSE ``aud`` checks, so they are a plain value with no transport in it.
* **The path Envoy forwards.** The generated Envoy configuration normalizes the path (dot
  segments) and merges slashes before it asks for a decision and before the app sees it; the
  ``htu`` path gets the same treatment, so ``/a//b`` and ``/a/./b`` match what was forwarded
  (``/a/b``). The proof still names exactly the resource the app receives, and policy matching
  is unaffected (it runs on the forwarded path, see ``policy.canonical_path``).
"""

from __future__ import annotations

import functools
import re
from urllib.parse import urlsplit

from sidecar.authz.decision import RequestView
from sidecar.errors import AuthError, Reason
from sidecar.jose.rfc9449_dpop import is_authority, normalize_htu

_SLASHES = re.compile(r"/{2,}")
#: A syntactically neutral origin to normalize a bare path with the same rules as an htu.
_PATH_ONLY = "http://path.invalid"


def parse_authority(value: str) -> str:
    """``value`` as a normalized origin (lower-case scheme and host, no default port), the form
    :func:`htu_origin` gives; ValueError unless it is ``http(s)://host[:port]`` and nothing more."""
    parts = urlsplit(value)
    if parts.path not in ("", "/") or "?" in value or "#" in value:
        raise ValueError("an origin has no path, query or fragment")
    return _split(normalize_htu(value))[0]


def forwarded_path(path: str) -> str:
    """A normalized path as Envoy forwards it: dot segments removed (RFC 3986 §5.2.4, as
    ``normalize_path`` does), then runs of slashes merged (``merge_slashes``)."""
    segments = path.split("/")[1:]
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        elif seg == ".":
            if last:
                out.append("")
        else:
            out.append(seg)
    return _SLASHES.sub("/", "/" + "/".join(out))


def _split(normalized: str) -> tuple[str, str]:
    slash = normalized.index("/", normalized.index("://") + 3)
    return normalized[:slash], normalized[slash:]


@functools.lru_cache(maxsize=4096)  # clients repeat the same few URLs
def htu_parts(url: str) -> tuple[str, str]:
    """(origin, forwarded path) of an absolute http(s) URI; ValueError if it is not one."""
    origin, path = _split(normalize_htu(url))
    return origin, forwarded_path(path)


class RequestTarget:
    """Step 9 for the ingress: raises AuthError unless ``htu`` names the request's target."""

    __slots__ = ("authorities",)

    def __init__(self, authorities: frozenset[str] = frozenset()) -> None:
        self.authorities = authorities

    def check(self, htu: str, view: RequestView) -> None:
        try:
            origin, path = htu_parts(htu)
        except ValueError:
            raise AuthError(Reason.HTU_MISMATCH, "proof htu is not a valid http(s) URI") from None
        if self.authorities:
            if origin not in self.authorities:
                raise AuthError(
                    Reason.UNKNOWN_AUTHORITY, "proof htu origin is not one of authz.authorities"
                )
            request_path = self._path(view.path)
        else:
            # The client's Host builds the origin here: Envoy answers 400 to one that is no
            # authority, but the core does not rely on it.
            if not is_authority(view.authority):
                raise AuthError(Reason.HTU_MISMATCH, "the request's Host is not an authority")
            try:
                request_origin, request_path = htu_parts(view.url)
            except ValueError:
                raise AuthError(Reason.HTU_MISMATCH, "the request URI is not valid") from None
            if origin != request_origin:
                raise AuthError(Reason.HTU_MISMATCH, "proof htu does not match the request URI")
        if path != request_path:
            raise AuthError(Reason.HTU_MISMATCH, "proof htu does not match the request URI")

    @staticmethod
    def _path(raw: str) -> str:
        if not raw.startswith("/"):
            raise AuthError(Reason.HTU_MISMATCH, "the request path is not absolute")
        # The client's Host plays no part: the path alone, normalized as an htu path is.
        return htu_parts(_PATH_ONLY + raw)[1]
