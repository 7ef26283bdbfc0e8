"""Header rules of the egress proxy (sans-IO).

RFC 9110 §7.6.1: a proxy MUST remove the hop-by-hop fields — ``Connection`` and every field it
lists — and SHOULD remove the ones known to be hop-by-hop even when not listed: ``Keep-Alive``,
``Proxy-Connection``, ``TE``, ``Transfer-Encoding``, ``Upgrade`` (RFC 9110 §7.8), ``Trailer``,
and the ``Proxy-*`` fields addressed to this proxy (``Proxy-Authorization``,
``Proxy-Authenticate``). The message framing is redone by our own HTTP stack, which is why
``Transfer-Encoding`` may go; ``Content-Length`` is kept (bodies are passed through unchanged:
the client never decompresses). ``Expect`` is answered here (``100 Continue``) and not sent on.
``Host`` is rewritten to the upstream's authority, which is also the authority of the DPoP
``htu`` — so the receiver reconstructs exactly the URL the proof names.

``X-Forwarded-*`` policy (``egress.x_forwarded``):

* ``keep`` (default) — the sidecar is part of the calling workload, not an intermediary the
  callee should know about: whatever ``X-Forwarded-*`` / ``Forwarded`` the app sent passes
  unchanged and nothing is added. (Loopback addresses would tell the callee nothing.)
* ``strip`` — remove every ``X-Forwarded-*`` and ``Forwarded`` field the app sent.
* ``append`` — act as a classic proxy: append the app's address to ``X-Forwarded-For``, set
  ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` (the Host the app used).

``Via`` (RFC 9110 §7.6.3) is appended unless ``egress.via: false``.

Credentials: with ``on_existing_authorization: replace`` the app's ``Authorization`` and
``DPoP`` are removed before ours are added; ``keep`` forwards the app's own credentials
untouched (nothing is injected); ``reject`` refuses the request with 403. On an
``auth: wimse`` upstream the app's ``Authorization``, ``DPoP``, ``Workload-Identity-Token`` and
``Workload-Proof-Token`` are always removed (:mod:`sidecar.egress.wimse`).
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict

#: RFC 9110 §7.6.1 and §7.8 (Upgrade), plus the Proxy-* fields meant for this hop.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_DROP = HOP_BY_HOP | {"host", "expect"}
CREDENTIALS = frozenset({"authorization", "dpop"})


def connection_options(values: Iterable[str]) -> frozenset[str]:
    """Field names listed in ``Connection`` (RFC 9110 §7.6.1), lower-cased."""
    names: set[str] = set()
    for value in values:
        for item in value.split(","):
            item = item.strip().lower()
            if item:
                names.add(item)
    return frozenset(names)


def request_headers(
    incoming: Iterable[tuple[str, str]],
    *,
    drop_credentials: bool,
    credentials: frozenset[str] = CREDENTIALS,
    x_forwarded: str = "keep",
    peer: str | None = None,
    proto: str = "http",
    via: str | None = None,
) -> CIMultiDict[str]:
    """The headers to send upstream (without our credentials, which the caller adds).
    ``credentials``: the lower-case names ``drop_credentials`` removes (a WIMSE upstream
    adds the WIMSE headers)."""
    out: CIMultiDict[str] = CIMultiDict()
    original_host: str | None = None
    connection: list[str] = []
    for name, value in incoming:
        lower = name.lower()
        if lower in _REQUEST_DROP or lower.startswith("proxy-"):
            if lower == "host":
                original_host = value
            elif lower == "connection":
                connection.append(value)
            continue
        if drop_credentials and lower in credentials:
            continue
        if (
            x_forwarded != "keep"
            and (lower.startswith("x-forwarded-") or lower == "forwarded")
            and (x_forwarded == "strip" or lower in ("x-forwarded-proto", "x-forwarded-host"))
        ):
            continue  # strip: all of them; append: the ones we set ourselves
        out.add(name, value)
    if connection:  # the fields it lists, wherever they came (before or after it)
        for listed in connection_options(connection):
            out.popall(listed, None)
    if x_forwarded == "append":
        if peer:
            prior = out.getall("X-Forwarded-For", [])
            out.popall("X-Forwarded-For", None)
            out["X-Forwarded-For"] = ", ".join([*prior, peer])
        out["X-Forwarded-Proto"] = proto
        if original_host:
            out["X-Forwarded-Host"] = original_host
    if via:
        prior_via = out.getall("Via", [])
        out.popall("Via", None)
        out["Via"] = ", ".join([*prior_via, via])
    return out


def response_headers(
    incoming: Iterable[tuple[str, str]], *, drop: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """The upstream response's headers to pass to the app: all but the hop-by-hop ones (and
    the lower-case names in ``drop``, which the caller sets itself)."""
    out: list[tuple[str, str]] = []
    connection: list[str] = []
    for name, value in incoming:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower.startswith("proxy-") or lower in drop:
            if lower == "connection":
                connection.append(value)
            continue
        out.append((name, value))
    if connection:
        listed = connection_options(connection)
        return [(name, value) for name, value in out if name.lower() not in listed]
    return out
