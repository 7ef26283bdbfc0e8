"""aiohttp adapters: parse the request, call the Broker, render the answer. No decisions here.

Public listener (TCP, default 127.0.0.1:8443; every path below is under the issuer's path):

* ``GET /.well-known/openid-configuration`` (and the RFC 8414 ``oauth-authorization-server``
  twin): the metadata document.
* ``GET /jwks.json``: the signing keys (``Cache-Control: public, max-age=N``, ETag).
* ``POST /token``: RFC 8693 token exchange with a DPoP proof.
* ``GET /revocations``: ``{"subjects": [...], "jtis": [...]}``, strong ETag, 304; long-poll
  with ``If-None-Match`` + ``Prefer: wait=N`` (see revocation.py).

Attestation socket (``attestation.socket``, mode 0666): ``POST /token`` with ``audience``
(repeatable) and a DPoP proof whose ``htu`` is ``http://<Host>/token`` (``http://localhost/token``
from aiohttp's UnixConnector). The caller is whoever holds the connection (SO_PEERCRED).

Admin socket (``admin.socket``, mode 0600, callers with our uid or root only):
``POST /admin/revoke`` with JSON ``{"sub": S}`` or ``{"jti": J}`` and optionally
``"action": "restore"``; ``GET /admin/revocations``; ``GET /admin/entries`` (every entry in
force, with its source: ``config`` or ``runtime``) and ``POST /admin/entries`` with
``{"action": "add", "entry": {...}}`` or ``{"action": "remove", "spiffe_id": S}``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from sidecar.broker.attestation_unix import AttestationFailure, PeerTracker, read_peer
from sidecar.broker.core import Broker, Issued
from sidecar.broker.oauth import MAX_FORM_BYTES, NO_STORE, OAuthError, TokenHttpRequest
from sidecar.broker.revocation import etag_matches
from sidecar.jose.rfc9449_dpop import is_authority
from sidecar.revocation_wire import CHANGED_HEADER, wait_preference

log = logging.getLogger(__name__)

JSON = "application/json"


def _json(
    body: bytes, *, status: int = 200, headers: tuple[tuple[str, str], ...] = ()
) -> web.Response:
    resp = web.Response(body=body, status=status, content_type=JSON)
    for name, value in headers:
        resp.headers[name] = value
    return resp


def _oauth_error(exc: OAuthError) -> web.Response:
    return _json(exc.body(), status=exc.status, headers=NO_STORE + exc.headers)


def _issued(issued: Issued) -> web.Response:
    return _json(issued.body, headers=NO_STORE)


async def token_request(request: web.Request, scheme: str) -> TokenHttpRequest:
    """Collect what the Broker decides on; nothing is judged here. The htu is the token
    endpoint URL as the client addressed it (RFC 9449 §4.3 step 9): our scheme, the Host
    header, the path without query (not ``request.host``: without a Host header it falls back
    to ``socket.getfqdn()``, a blocking DNS call). A Host that is no ``host[:port]`` gives no
    htu: ``broker?`` would make the path a query, matching a proof for ``/``."""
    host = request.headers.get("Host")
    path = request.raw_path.split("?", 1)[0]
    body: bytes | None = None
    if request.content_length is None or request.content_length <= MAX_FORM_BYTES:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            body = None
    return TokenHttpRequest(
        content_type=request.headers.get("Content-Type"),
        body=body,
        authorization=request.headers.get("Authorization"),
        dpop=tuple(request.headers.getall("DPoP", ())),
        htu=f"{scheme}://{host}{path}" if host and is_authority(host) else None,
    )


def make_public_app(broker: Broker) -> web.Application:
    cfg = broker.cfg
    base = cfg.base_path
    scheme = cfg.scheme
    discovery_headers = (("Cache-Control", "public, max-age=300"),)
    jwks_cache = f"public, max-age={cfg.keys.jwks_max_age}"

    async def discovery(_: web.Request) -> web.Response:
        return _json(broker.discovery, headers=discovery_headers)

    async def jwks(request: web.Request) -> web.Response:
        body, etag = broker.jwks()
        headers = (("Cache-Control", jwks_cache), ("ETag", etag))
        if etag_matches(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers=dict(headers))
        return _json(body, headers=headers)

    async def bundle(_: web.Request) -> web.Response:
        # A SPIFFE bundle endpoint (https_web profile) for ingresses verifying our WITs.
        return _json(broker.wit_bundle(), headers=(("Cache-Control", jwks_cache),))

    async def token(request: web.Request) -> web.Response:
        try:
            return _issued(await broker.exchange(await token_request(request, scheme)))
        except OAuthError as exc:
            return _oauth_error(exc)

    store = broker.revocations

    async def revocations(request: web.Request) -> web.Response:
        if_none_match = request.headers.get("If-None-Match")
        wait = wait_preference(request.headers.getall("Prefer", ()))
        applied: tuple[tuple[str, str], ...] = ()
        granted = min(wait or 0, cfg.revocation_max_wait)
        # Beyond max_waiting held requests, answer at once without Preference-Applied: the
        # verifier then polls at its interval instead of piling up here.
        if granted > 0 and store.waiting < cfg.revocation_max_waiting:
            applied = (("Preference-Applied", f"wait={granted}"),)
            await store.wait_for_change(if_none_match, granted)
        published = store.published()
        headers = (
            ("ETag", published.etag),
            ("Cache-Control", "no-cache"),
            (CHANGED_HEADER, f"{store.changed_at:.3f}"),
            *applied,
        )
        long_poll = "yes" if applied else "no"
        if etag_matches(if_none_match, published.etag):
            broker.metrics.revocation_request("304", long_poll).inc()
            return web.Response(status=304, headers=dict(headers))
        broker.metrics.revocation_request("200", long_poll).inc()
        return _json(published.body, headers=headers)

    app = web.Application(client_max_size=MAX_FORM_BYTES)
    app.router.add_get(f"{base}/.well-known/openid-configuration", discovery)
    app.router.add_get(f"{base}/.well-known/oauth-authorization-server", discovery)
    if base:  # RFC 8414 §3.1: the well-known segment goes between host and issuer path
        app.router.add_get(f"/.well-known/oauth-authorization-server{base}", discovery)
    app.router.add_get(f"{base}/jwks.json", jwks)
    app.router.add_get(f"{base}/bundle", bundle)
    app.router.add_post(f"{base}/token", token)
    app.router.add_get(f"{base}/revocations", revocations)
    return app


def make_unix_app(broker: Broker, tracker: PeerTracker) -> web.Application:
    async def token(request: web.Request) -> web.Response:
        try:
            peer: Any = tracker.peer(request.transport)
        except AttestationFailure as exc:
            peer = exc
        try:
            # Plain HTTP over the socket: the htu scheme is always http.
            return _issued(await broker.attest_unix(peer, await token_request(request, "http")))
        except OAuthError as exc:
            return _oauth_error(exc)

    app = web.Application(client_max_size=MAX_FORM_BYTES)
    app.router.add_post("/token", token)
    return app


async def _admin_change(change: Awaitable[dict[str, Any]], what: str) -> web.Response:
    """The answer to an admin change: its result, its refusal, or 500 when its state file
    cannot be written."""
    try:
        result = await change
    except OAuthError as exc:
        return _oauth_error(exc)
    except OSError as exc:
        log.error("cannot save %s: %s", what, exc)
        return _json(
            b'{"error":"server_error","error_description":"cannot write the state file"}',
            status=500,
        )
    return _json(json.dumps(result).encode())


def make_admin_socket_app(broker: Broker) -> web.Application:
    own_uid = os.geteuid()

    def caller_uid(request: web.Request) -> int:
        """Only our own user and root may change revocations (the socket is 0600 too)."""
        sock = request.transport.get_extra_info("socket") if request.transport else None
        try:
            uid = read_peer(sock).uid
        except (OSError, AttributeError):
            raise web.HTTPForbidden(text="cannot identify the caller\n") from None
        if uid not in (0, own_uid):
            raise web.HTTPForbidden(text=f"uid {uid} may not administer this broker\n")
        return uid

    async def revoke(request: web.Request) -> web.Response:
        uid = caller_uid(request)
        try:
            doc = json.loads(await request.read())
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or len({"sub", "jti"} & doc.keys()) != 1:
            return _json(
                b'{"error":"invalid_request","error_description":"send {\\"sub\\": ...} or '
                b'{\\"jti\\": ...}"}',
                status=400,
            )
        kind = "sub" if "sub" in doc else "jti"
        action = doc.get("action", "revoke")
        if action not in ("revoke", "restore"):
            return _json(
                b'{"error":"invalid_request","error_description":"bad action"}', status=400
            )
        change = broker.change_revocation(
            kind, doc[kind], restore=action == "restore", actor_uid=uid
        )
        return await _admin_change(change, "revocations")

    async def listing(request: web.Request) -> web.Response:
        caller_uid(request)
        published = broker.revocations.published()
        return _json(published.body, headers=(("ETag", published.etag),))

    async def entries(request: web.Request) -> web.Response:
        caller_uid(request)
        return _json(json.dumps({"entries": broker.entries.listing()}).encode())

    async def change_entries(request: web.Request) -> web.Response:
        uid = caller_uid(request)
        try:
            doc = json.loads(await request.read())
        except ValueError:
            doc = None
        return await _admin_change(broker.change_entries(doc, actor_uid=uid), "entries")

    app = web.Application(client_max_size=64 * 1024)
    app.router.add_post("/admin/revoke", revoke)
    app.router.add_get("/admin/revocations", listing)
    app.router.add_get("/admin/entries", entries)
    app.router.add_post("/admin/entries", change_entries)
    return app
