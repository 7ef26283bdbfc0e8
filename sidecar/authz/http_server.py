"""Envoy ext_authz over HTTP (aiohttp): the same Decision as the gRPC server, rendered as
Envoy's HTTP authorization service expects it.

Envoy forwards the original method and path (after ``path_prefix``) with only the headers its
``allowed_headers`` list names. 200 allows: headers matching ``allowed_upstream_headers`` go to
the app and ``x-envoy-auth-headers-to-remove`` lists what Envoy strips. Anything else denies,
and the client sees our status, body and the headers ``allowed_client_headers`` permit.
"""

from __future__ import annotations

from aiohttp import web

from sidecar.authz.decision import Allow, Decision, RequestView
from sidecar.authz.forwarded import connection_scheme, request_method
from sidecar.authz.guard import CheckGuard

HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"


def view_from_http(request: web.Request, *, path_prefix: str, default_scheme: str) -> RequestView:
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        # The same merge Envoy's gRPC map does, so a duplicated DPoP header is visible.
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    path = request.raw_path
    if path_prefix and path.startswith(path_prefix):
        path = path[len(path_prefix) :] or "/"
    return RequestView(
        method=request_method(request.method),
        scheme=connection_scheme(headers, default_scheme),
        authority=headers.get("host", ""),
        path=path,
        headers=headers,
    )


def render_http_response(decision: Decision) -> web.Response:
    if isinstance(decision, Allow):
        resp = web.Response(status=200)
        for key, value in decision.headers_to_set:
            resp.headers[key] = value
        for key, value in decision.response_headers:
            resp.headers[key] = value
        resp.headers[HEADERS_TO_REMOVE] = ",".join(decision.headers_to_remove)
        return resp
    resp = web.Response(status=decision.status, text=decision.body)
    for key, value in decision.headers:
        if key != "content-type":
            resp.headers[key] = value
    resp.content_type = "application/json"
    return resp


def make_http_app(
    guard: CheckGuard, *, path_prefix: str = "", default_scheme: str = "http"
) -> web.Application:
    def view_of(request: web.Request) -> RequestView:
        return view_from_http(request, path_prefix=path_prefix, default_scheme=default_scheme)

    async def check(request: web.Request) -> web.Response:
        return render_http_response(await guard.check(view_of, request))

    app = web.Application(client_max_size=64 * 1024)
    app.router.add_route("*", "/{tail:.*}", check)
    return app
