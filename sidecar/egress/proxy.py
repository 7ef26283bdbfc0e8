"""The egress proxy: aiohttp low-level servers in front, one aiohttp ClientSession behind.

Per request (:meth:`EgressProxy._forward`):

1. pick the target (the listener's upstream, or the forward proxy's destination map);
2. apply the ``on_existing_authorization`` policy to the app's own credentials;
3. take the cached token (no I/O when one is usable; else wait briefly, or answer 503
   ``no_valid_token`` with the reason — an unusable token is never sent);
4. build the upstream headers (:mod:`sidecar.egress.headers`) and sign a fresh DPoP proof for
   the exact method and upstream URL, with the origin's latest nonce;
5. send, streaming the request body (a body up to ``nonce_retry_buffer`` bytes is buffered so
   that a ``use_dpop_nonce`` challenge can be answered by ONE retry with the new nonce, and a
   proof refused while the upstream's ``Date`` shows its clock elsewhere by ONE retry with a
   corrected ``iat`` — :mod:`sidecar.identity.clock_offset`);
6. stream the response back, minus hop-by-hop headers.

Bodies are never held whole: aiohttp's readers have flow control (a bounded buffer that pauses
the socket), and we move one chunk at a time. Connections to upstreams are pooled (keep-alive).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from functools import partial
from typing import Any, ClassVar, Protocol

import aiohttp
from aiohttp import HttpVersion10, HttpVersion11, web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from yarl import URL

from sidecar.egress import wimse as wimse_egress
from sidecar.egress.config import EgressConfig, ForwardProxyConfig, Target
from sidecar.egress.headers import CREDENTIALS, request_headers, response_headers
from sidecar.egress.metrics import EgressMetrics
from sidecar.egress.nonce import NonceCache, dpop_error
from sidecar.identity.clock_offset import ClockOffsets, says_time_was_wrong
from sidecar.identity.errors import IdentityError
from sidecar.identity.token import IssuedToken
from sidecar.jose.rfc9449_dpop import ProofSigner
from sidecar.jose.wimse_wpt import WptSigner
from sidecar.net_limits import GuardedSite, ListenerGuard, server_options
from sidecar.observability.logs import RateLimitedLog
from sidecar.tls_settings import default_client_context, tls_failure

log = logging.getLogger(__name__)

FORWARD_LABEL = "forward_proxy"
SMALL_BODY = 64 * 1024  # a response body up to this size is sent with the head
_NO_BODY_STATUS = frozenset({204, 304})
_CONTENT_LENGTH = frozenset({"content-length"})  # a small body's is set from the body itself
_ALLOW = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# What the low-level server accepts from the app: generous, like Envoy's 60 KiB of headers.
MAX_HEADER_BYTES = 64 * 1024


# aiohttp's own headers, never added: the app's headers go upstream as they are.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class _UpstreamRequest(aiohttp.ClientRequest):
    """aiohttp's client request without its per-request rebuilding of the headers it must not
    add (a sorted CIMultiDict plus a copy of the request's headers, ~6 µs): ours are the same
    for every request, and with all of them skipped aiohttp adds none."""

    _SKIP: ClassVar[CIMultiDict[None]] = CIMultiDict((h, None) for h in _NO_AUTO_HEADERS)

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = self._SKIP


class TokenProvider(Protocol):
    """What the proxy needs from :class:`sidecar.identity.source.TokenSource`."""

    def current(self, audience: str) -> IssuedToken | None: ...

    async def get(self, audience: str) -> IssuedToken: ...


class _LocalAnswer(Exception):
    """An answer the proxy gives itself instead of forwarding."""

    def __init__(self, status: int, reason: str, detail: str, **extra: Any) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.extra = extra


def _local_response(answer: _LocalAnswer, target: str) -> web.Response:
    body = {"error": answer.reason, **answer.extra, "upstream": target, "detail": answer.detail}
    headers = {"Cache-Control": "no-store", "X-Sidecar-Error": answer.reason}
    if answer.status == 503:
        headers["Retry-After"] = "1"
    if answer.status == 405:
        headers["Allow"] = _ALLOW
    return web.Response(
        status=answer.status,
        body=json.dumps(body).encode() + b"\n",
        content_type="application/json",
        headers=headers,
    )


async def _chain(prefix: bytes, rest: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    yield prefix
    while True:
        chunk = await rest.readany()
        if not chunk:
            return
        yield chunk


class EgressProxy:
    """All egress listeners of one process, sharing one connection pool and nonce cache."""

    def __init__(
        self,
        cfg: EgressConfig,
        *,
        tokens: TokenProvider,
        signer: ProofSigner,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.time,
        log_interval: float = 30.0,
        offsets: ClockOffsets | None = None,
        wpt_signer: WptSigner | None = None,
    ) -> None:
        self.cfg = cfg
        self._tokens = tokens
        self._signer = signer
        # auth: wimse upstreams: WPTs by the key the WIT confirms (the DPoP key).
        self._wpt = wpt_signer
        if wpt_signer is None and cfg.wimse_keys:
            raise ValueError("auth: wimse upstreams need a WPT signer")
        self._clock = clock
        self.metrics = EgressMetrics(registry)
        self._registry = registry
        self.nonces = NonceCache()
        # Per upstream origin: its clock minus ours, for the proofs' iat (shared with identity).
        self.offsets = offsets if offsets is not None else ClockOffsets(clock)
        # An outage answers every request with the same 5xx: one line per upstream and
        # reason per interval, with a count.
        self._warn = RateLimitedLog(log, log_interval)
        self._session: aiohttp.ClientSession | None = None
        self._default_ssl = default_client_context()
        self._runners: list[web.BaseRunner] = []
        self.ports: dict[str, int] = {}
        self.forward_port: int | None = None
        self._forward_targets: dict[tuple[str, str, int], Target] = {}
        self._via = {v: f"{v.major}.{v.minor} sidecar" for v in (HttpVersion10, HttpVersion11)}

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        t = self.cfg.timeouts
        connector = aiohttp.TCPConnector(
            limit=self.cfg.max_connections,
            limit_per_host=0,
            keepalive_timeout=self.cfg.keepalive_timeout,
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=t.total, connect=t.connect, sock_read=t.read),
            auto_decompress=False,  # bodies pass through byte for byte
            # Send exactly the app's headers: no User-Agent, Accept, Accept-Encoding or
            # Content-Type of aiohttp's own.
            skip_auto_headers=_NO_AUTO_HEADERS,
            request_class=_UpstreamRequest,
            trust_env=False,  # never route through the environment's HTTP_PROXY
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )
        for upstream in self.cfg.upstreams:
            name = upstream.target.name
            port = await self._listen(
                partial(self._reverse, upstream.target), upstream.listen, f"egress:{name}"
            )
            self.ports[name] = port
        if self.cfg.forward_proxy is not None:
            fp = self.cfg.forward_proxy
            self.forward_port = await self._listen(
                partial(self._forward_proxy, fp), fp.listen, f"egress:{FORWARD_LABEL}"
            )

    async def _listen(self, handler: Any, listen: tuple[str, int], label: str) -> int:
        limits = self.cfg.connections
        server = web.Server(
            handler,
            access_log=None,
            max_line_size=MAX_HEADER_BYTES,
            max_field_size=MAX_HEADER_BYTES,
            **server_options(limits),
        )
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        guard = ListenerGuard(label, limits, self._registry)
        site = GuardedSite(runner, guard, listen)
        await site.start()
        for addr in runner.addresses:
            if isinstance(addr, tuple):
                return int(addr[1])
        raise OSError(f"no TCP address for listener {listen}")  # pragma: no cover

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- entry points ---------------------------------------------------------------------

    async def _reverse(self, target: Target, request: web.BaseRequest) -> web.StreamResponse:
        """A listener bound to one upstream: the app's path and query go to that upstream."""
        started = time.perf_counter()
        if request.method == "CONNECT":
            return self._answer(
                request,
                target.name,
                started,
                _LocalAnswer(
                    405,
                    "connect_not_supported",
                    "this listener forwards plain HTTP requests to "
                    f"{target.origin}; CONNECT tunnels are not supported",
                ),
            )
        rel = request.rel_url
        path = target.base_path + rel.raw_path
        query = rel.raw_query_string
        return await self._forward(request, target, path, query, started)

    async def _forward_proxy(
        self, fp: ForwardProxyConfig, request: web.BaseRequest
    ) -> web.StreamResponse:
        """HTTP_PROXY-style: absolute-form targets, allowed only for mapped destinations."""
        started = time.perf_counter()
        try:
            if request.method == "CONNECT":
                raise _LocalAnswer(
                    405,
                    "connect_not_supported",
                    "CONNECT (HTTPS through the proxy) is refused: credentials cannot be "
                    "injected into a TLS tunnel. Call http:// URLs through this proxy; map a "
                    "destination to an https:// upstream to have the sidecar originate TLS.",
                )
            raw = request.raw_path
            if not raw.startswith(("http://", "https://")):
                raise _LocalAnswer(
                    400,
                    "absolute_form_required",
                    "this is a forward proxy: the request target must be an absolute "
                    "http:// URL (RFC 9112 §3.2.2)",
                )
            url = URL(raw, encoded=True)
            host = (url.raw_host or "").lower()
            port = url.explicit_port or (443 if url.scheme == "https" else 80)
            dest = fp.destinations.get((host, port))
            if dest is None:
                raise _LocalAnswer(
                    403,
                    "destination_not_allowed",
                    f"{host}:{port} is not a configured egress destination; requests are "
                    "never passed through without credentials",
                )
        except _LocalAnswer as answer:
            return self._answer(request, FORWARD_LABEL, started, answer)
        target = dest.target
        if not target.origin:
            key = (url.scheme, host, port)
            cached = self._forward_targets.get(key)
            if cached is None:
                default = port == (443 if url.scheme == "https" else 80)
                authority = f"[{host}]" if ":" in host else host
                origin = f"{url.scheme}://{authority}" + ("" if default else f":{port}")
                cached = self._forward_targets[key] = replace(target, origin=origin)
            target = cached
        return await self._forward(
            request, target, target.base_path + url.raw_path, url.raw_query_string, started
        )

    # -- the request path -----------------------------------------------------------------

    def _via_for(self, version: Any) -> str:
        via = self._via.get(version)
        return via if via is not None else f"{version.major}.{version.minor} sidecar"

    def _answer(
        self, request: web.BaseRequest, label: str, started: float, answer: _LocalAnswer
    ) -> web.Response:
        self.metrics.local_response(label, answer.reason)
        self.metrics.request(label, answer.status, time.perf_counter() - started, -1.0)
        if answer.status >= 500:
            self._warn.warning(
                (label, answer.reason),
                "egress %s %s %s: %s",
                label,
                request.method,
                answer.reason,
                answer.detail,
            )
        return _local_response(answer, label)

    async def _token(self, target: Target) -> IssuedToken:
        """The target's access token, or its WIT (``auth: wimse``)."""
        key = target.token_key
        token = self._tokens.current(key)
        if token is not None:
            return token
        try:
            return await self._tokens.get(key)
        except IdentityError as err:
            raise _LocalAnswer(503, "no_valid_token", err.detail, audience=key) from None

    async def _body(self, request: web.BaseRequest) -> tuple[Any, bool]:
        """(data for the upstream request, whether it can be sent twice)."""
        if not request.body_exists:
            return None, True
        if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == (
            "100-continue"
        ):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        limit = self.cfg.nonce_retry_buffer
        length = request.content_length
        if length is not None:
            if length <= limit:
                return await request.read(), True
            return request.content, False  # Content-Length is kept: no chunking upstream
        buf = bytearray()
        while len(buf) <= limit:
            chunk = await request.content.readany()
            if not chunk:
                return bytes(buf), True
            buf += chunk
        return _chain(bytes(buf), request.content), False

    async def _forward(
        self, request: web.BaseRequest, target: Target, path: str, query: str, started: float
    ) -> web.StreamResponse:
        label = target.name
        wimse = target.wimse
        try:
            inject = True
            if wimse is None and "Authorization" in request.headers:
                mode = target.on_existing_authorization
                if mode == "reject":
                    raise _LocalAnswer(
                        403,
                        "existing_authorization",
                        "the request carries its own Authorization header and this "
                        "listener is configured with on_existing_authorization: reject",
                    )
                inject = mode == "replace"
            token = await self._token(target) if inject else None
            append = self.cfg.x_forwarded == "append"
            headers = request_headers(
                request.headers.items(),
                drop_credentials=inject,
                credentials=wimse_egress.STRIPPED if wimse is not None else CREDENTIALS,
                x_forwarded=self.cfg.x_forwarded,
                peer=request.remote if append else None,
                proto=request.scheme if append else "http",
                via=self._via_for(request.version) if self.cfg.via else None,
            )
            body, replayable = await self._body(request)
        except _LocalAnswer as answer:
            return self._answer(request, label, started, answer)
        except (ConnectionError, aiohttp.ClientError) as exc:  # the app went away mid-body
            return self._answer(
                request, label, started, _LocalAnswer(400, "request_body_error", str(exc))
            )
        htu = target.origin + path
        url = URL(htu + ("?" + query if query else ""), encoded=True)
        origin = target.origin
        session = self._session
        assert session is not None
        method = request.method
        tls = target.tls
        default_ssl = self._default_ssl
        upstream_time = -1.0
        sent_at = 0.0
        resp: aiohttp.ClientResponse | None = None
        try:
            offsets = self.offsets
            for attempt in (0, 1):
                signed_at = self._clock()
                if wimse is not None:
                    assert token is not None and self._wpt is not None
                    wimse_egress.add_credentials(
                        headers,
                        settings=wimse,
                        signer=self._wpt,
                        wit=token.token,
                        url=htu,
                        now=signed_at + offsets.offset(origin),
                    )
                elif token is not None:
                    headers["Authorization"] = token.authorization
                    if token.is_dpop:
                        headers["DPoP"] = self._signer.proof(
                            method=method,
                            url=htu,
                            now=signed_at + offsets.offset(origin),
                            access_token=token.token,
                            nonce=self.nonces.get(origin),
                        )
                sent_at = time.perf_counter()
                resp = await session.request(
                    method,
                    url,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    ssl=default_ssl if tls is None else tls.context,
                    server_hostname=None if tls is None else tls.server_name,
                )
                upstream_time = time.perf_counter() - sent_at
                offered = self.nonces.offer(origin, resp.headers.get("DPoP-Nonce"))
                again = None
                if (
                    token is not None
                    and token.is_dpop
                    and (resp.status in (401, 503) or offsets.in_force(origin))
                ):
                    again = self._sign_again(resp, origin, offered, signed_at)
                if again is not None and attempt == 0:
                    if again == "nonce":
                        outcome = "retried" if replayable else "not_replayable"
                        self.metrics.nonce_retries.labels(label, outcome).inc()
                    if replayable:
                        resp.release()
                        resp = None
                        continue
                break
        except TimeoutError:
            return self._answer(
                request,
                label,
                started,
                _LocalAnswer(504, "upstream_timeout", f"{origin} did not answer in time"),
            )
        except aiohttp.ClientSSLError as exc:  # before its base, ClientConnectorError
            return self._answer(
                request,
                label,
                started,
                _LocalAnswer(502, "upstream_tls_error", f"{origin}: {tls_failure(exc)}"),
            )
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or type(exc.os_error).__name__
            return self._answer(
                request,
                label,
                started,
                _LocalAnswer(502, "upstream_unreachable", f"cannot connect to {origin}: {reason}"),
            )
        except (aiohttp.ClientError, OSError) as exc:
            if resp is not None:
                resp.close()
            return self._answer(
                request,
                label,
                started,
                _LocalAnswer(502, "upstream_error", f"{origin}: {type(exc).__name__} {exc}"),
            )
        assert resp is not None
        return await self._relay(request, resp, label, started, sent_at, upstream_time)

    def _sign_again(
        self, resp: aiohttp.ClientResponse, origin: str, offered: bool, signed_at: float
    ) -> str | None:
        """Why a new proof would fix the upstream's refusal: ``nonce`` (a ``use_dpop_nonce``
        challenge with a new nonce) or ``clock`` (a proof refusal whose ``Date`` corrected
        the upstream's clock offset); None if it would not. Also keeps a correction in force
        up to date from ordinary answers."""
        error = None
        if resp.status == 401:
            error = dpop_error(resp.headers.getall("WWW-Authenticate", ()))
        # 503 proof_predates_restart: a restarted ingress found iat too early (a clock behind).
        restarted = resp.status == 503 and says_time_was_wrong(resp.headers)
        refused = error in ("invalid_dpop_proof", "use_dpop_nonce") or restarted
        corrected = (refused or self.offsets.in_force(origin)) and self.offsets.learn(
            origin,
            resp.headers.get("Date"),
            signed_at,
            self._clock(),
            time_refused=refused and says_time_was_wrong(resp.headers),
        )
        if error == "use_dpop_nonce" and offered:
            return "nonce"
        return "clock" if refused and corrected else None

    async def _relay(
        self,
        request: web.BaseRequest,
        resp: aiohttp.ClientResponse,
        label: str,
        started: float,
        sent_at: float,
        upstream_time: float,
    ) -> web.StreamResponse:
        """Stream the upstream response to the app, one chunk at a time. A small body of
        known length is read first and sent with the head in one write (one system call and
        one TCP segment instead of two)."""
        head_at = time.perf_counter()
        length = resp.content_length
        if (
            length is not None
            and length <= SMALL_BODY
            and request.method != "HEAD"
            and resp.status not in _NO_BODY_STATUS
        ):
            try:
                body = await resp.read()
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                resp.close()
                return self._answer(
                    request,
                    label,
                    started,
                    _LocalAnswer(502, "upstream_error", f"response body: {type(exc).__name__}"),
                )
            finally:
                resp.release()
            small = web.Response(status=resp.status, reason=resp.reason, body=body)
            small_headers = small.headers
            for name, value in response_headers(resp.headers.items(), drop=_CONTENT_LENGTH):
                small_headers.add(name, value)
            self.metrics.request(
                label,
                resp.status,
                (sent_at - started) + (time.perf_counter() - head_at),
                upstream_time,
            )
            return small
        out = web.StreamResponse(status=resp.status, reason=resp.reason)
        out_headers = out.headers
        for name, value in response_headers(resp.headers.items()):
            out_headers.add(name, value)
        try:
            await out.prepare(request)
            prepared_at = time.perf_counter()
            self.metrics.request(
                label, resp.status, (sent_at - started) + (prepared_at - head_at), upstream_time
            )
            if request.method != "HEAD" and resp.status not in _NO_BODY_STATUS:
                content = resp.content
                while True:
                    chunk = await content.readany()
                    if not chunk:
                        break
                    await out.write(chunk)
            await out.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            # The app went away: drop the upstream connection too (its body is unread).
            resp.close()
            return out
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # The upstream failed mid-body: the status line is gone already, so the only
            # honest signal left is to cut the app's connection (no clean end of body).
            log.warning("egress %s: upstream body failed: %s", label, type(exc).__name__)
            resp.close()
            transport = request.transport
            if transport is not None:
                transport.close()
            return out
        finally:
            resp.release()
        return out

    # -- introspection --------------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession | None:
        return self._session

    def describe(self) -> dict[str, Any]:
        return {
            "listeners": dict(self.ports),
            "forward_proxy": self.forward_port,
            "nonce_origins": len(self.nonces),
        }
