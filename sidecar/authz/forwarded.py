"""What Envoy asserts about the client's request, read the same way by both transports.

The request's scheme decides the origin of the URL a DPoP proof's ``htu`` is compared with.
A client can claim any ``:scheme`` over HTTP/2 (Envoy trusts and forwards it), so neither
adapter reads it: both take ``x-forwarded-proto``, which the generated Envoy configuration
(``use_remote_address: true``, ``xff_num_trusted_hops: 0``) overwrites on every request with
``http`` or ``https`` from the downstream connection's TLS state.
"""

from __future__ import annotations

from collections.abc import Mapping

FORWARDED_PROTO = "x-forwarded-proto"
SCHEMES = frozenset({"http", "https"})


def connection_scheme(headers: Mapping[str, str], default_scheme: str) -> str:
    """The scheme of the client's connection to Envoy, from lower-cased check headers.

    Without ``x-forwarded-proto`` (a proxy configured not to set it) the operator's
    ``default_scheme`` applies. Any value other than one scheme (a list from trusted hops,
    junk) gives ``""``, which no ``htu`` matches: fail closed rather than guess.
    """
    value = headers.get(FORWARDED_PROTO)
    if value is None:
        return default_scheme
    value = value.strip().lower()
    return value if value in SCHEMES else ""


def request_method(method: str) -> str:
    """The method as both transports see it. aiohttp upper-cases the request line's method
    before the HTTP adapter sees it, so the gRPC adapter does the same with Envoy's (HTTP/2
    lets a client send ``get``): the proof's ``htm`` and the policy see one spelling."""
    return method.upper()
