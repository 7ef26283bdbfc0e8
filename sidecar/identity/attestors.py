"""Where tokens come from. Every attestor has the same shape::

    async fetch(audience) -> IssuedToken     # raises IdentityError, nothing else
    async close()

* ``unix`` — the broker's attestation socket: ``POST /token`` over HTTP on a Unix socket; the
  broker identifies us by ``SO_PEERCRED``. The DPoP proof names ``http://localhost/token``.
* ``k8s`` — RFC 8693 token exchange of the projected service-account token at the token
  endpoint found by OIDC discovery (``/.well-known/openid-configuration``, falling back to RFC
  8414 ``/.well-known/oauth-authorization-server``). The token file is re-read on EVERY
  exchange: the kubelet rewrites it before it expires.
* ``file`` — a token another agent keeps fresh. Re-read at every refresh (at least every
  ``poll_interval``) and re-parsed when its bytes changed; its expiry is its ``exp`` claim.
  It is sent as ``Bearer`` unless it carries ``cnf`` (then as ``DPoP`` with our proof, which
  only works if it is bound to our key: publish the public key with ``public_jwk_file`` so
  the agent can bind to it).

The unix and k8s attestors send a DPoP proof (RFC 9449 §5) so the token is bound to our key,
and answer an authorization server's nonce demand (§8) by retrying once with the nonce; the
latest nonce per server is kept for the next request. A proof refused while the server's
``Date`` shows its clock elsewhere is retried once with an ``iat`` on the server's clock
(:mod:`sidecar.identity.clock_offset`). Foreign exceptions (aiohttp, OS,
timeouts) become IdentityError at one place: :func:`_map_errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlencode, urlsplit

import aiohttp

from sidecar.identity.clock_offset import ClockOffsets, says_time_was_wrong
from sidecar.identity.errors import IdentityCode, IdentityError
from sidecar.identity.rfc8693_exchange import (
    JWT_TOKEN_TYPE,
    MAX_RESPONSE_BYTES,
    WIT_AUDIENCE,
    TokenRequest,
    attestation_form,
    exchange_form,
    fresh_nonce,
    nonce_challenge,
    parse_token_response,
    proof_refused,
)
from sidecar.identity.token import (
    IssuedToken,
    audiences_of,
    bound_jkt,
    has_cnf,
    numeric_claim,
    unverified_claims,
)
from sidecar.jose.rfc9449_dpop import ProofSigner
from sidecar.jose.wimse_wit import WIT_TOKEN_TYPE
from sidecar.tls_settings import TLSClient, request_options, tls_failure

log = logging.getLogger(__name__)

Clock = Callable[[], float]
UNIX_TOKEN_URL = "http://localhost/token"
DISCOVERY_TTL = 3600.0
MAX_SUBJECT_TOKEN_BYTES = 64 * 1024


class Attestor(Protocol):
    """A source of access tokens for one workload."""

    kind: str
    #: Refresh at least this often even if the token lives longer (None: no cap). The file
    #: attestor sets it so a token the agent replaced early is picked up.
    max_refresh_interval: float | None

    async def fetch(self, audience: str) -> IssuedToken: ...

    async def close(self) -> None: ...


@contextlib.asynccontextmanager
async def _map_errors(what: str) -> AsyncIterator[None]:
    """The one boundary where aiohttp/OS/timeout exceptions become IdentityError."""
    try:
        yield
    except IdentityError:
        raise
    except TimeoutError:
        raise IdentityError(IdentityCode.TIMEOUT, f"{what}: no answer in time") from None
    except aiohttp.ClientSSLError as exc:  # before its base, ClientConnectorError
        raise IdentityError(IdentityCode.UNAVAILABLE, f"{what}: {tls_failure(exc)}") from None
    except aiohttp.ClientConnectorError as exc:
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        raise IdentityError(
            IdentityCode.UNAVAILABLE, f"{what}: cannot connect ({reason})"
        ) from None
    except aiohttp.ClientResponseError as exc:
        raise IdentityError(
            IdentityCode.BAD_RESPONSE, f"{what}: {exc.message}", retryable=True
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise IdentityError(
            IdentityCode.UNAVAILABLE, f"{what}: {type(exc).__name__} {exc}"
        ) from None


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise IdentityError(IdentityCode.BAD_RESPONSE, f"response larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class DPoPTokenClient:
    """POSTs token requests with a DPoP proof; keeps the latest nonce per server origin and
    the server's clock offset (:class:`ClockOffsets`, shared with egress). A refused proof is
    signed again ONCE, when the server demanded a nonce (§8) or its ``Date`` corrected the
    offset. ``peer`` names the server for the offset (default: the ``htu`` origin)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        signer: ProofSigner,
        *,
        clock: Clock,
        require_dpop: bool,
        what: str,
        offsets: ClockOffsets | None = None,
        peer: str | None = None,
        tls: TLSClient | None = None,
    ) -> None:
        self._session = session
        self._tls = tls
        self._signer = signer
        self._clock = clock
        self._require_dpop = require_dpop
        self._what = what
        self._nonces: dict[str, str] = {}
        self._offsets = offsets if offsets is not None else ClockOffsets(clock)
        self._peer = peer

    async def request(self, req: TokenRequest, audience: str) -> IssuedToken:
        parts = urlsplit(req.htu)
        origin = f"{parts.scheme}://{parts.netloc}"
        peer = self._peer or origin
        offsets = self._offsets
        nonce = self._nonces.get(origin)
        body = urlencode(req.form).encode("ascii")
        for attempt in (0, 1):
            started = self._clock()
            proof = self._signer.proof(
                method="POST", url=req.htu, now=started + offsets.offset(peer), nonce=nonce
            )
            headers = {
                "DPoP": proof,
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
            }
            async with (
                _map_errors(f"{self._what} {req.url}"),
                self._session.post(
                    req.url, data=body, headers=headers, **request_options(self._tls)
                ) as resp,
            ):
                status, resp_headers = resp.status, resp.headers
                payload = await _read_limited(resp, MAX_RESPONSE_BYTES)
            offered = fresh_nonce(resp_headers)
            if offered is not None:
                self._nonces[origin] = offered
            refused = proof_refused(status, resp_headers, payload)
            corrected = (refused or offsets.in_force(peer)) and offsets.learn(
                peer,
                resp_headers.get("Date"),
                started,
                self._clock(),
                time_refused=refused and says_time_was_wrong(resp_headers),
            )
            demanded = nonce_challenge(status, resp_headers, payload)
            if attempt == 0 and (demanded is not None or (refused and corrected)):
                # RFC 9449 §8: retry once with the server-provided nonce and/or an iat on the
                # server's clock.
                nonce = demanded or nonce
                continue
            return parse_token_response(
                status,
                resp_headers,
                payload,
                audience=audience,
                requested_at=started,
                expected_jkt=self._signer.thumbprint,
                require_dpop=self._require_dpop,
                clock_offset=offsets.offset(peer),
                wit=req.wit,
            )
        raise AssertionError("unreachable")  # pragma: no cover


def _session(
    timeout: float, connector: aiohttp.BaseConnector | None = None
) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0)),
        trust_env=False,  # the issuer is reached directly, never through HTTP_PROXY
        raise_for_status=False,
    )


class UnixAttestor:
    """The broker's attestation endpoint on a Unix socket (peer credentials identify us)."""

    kind = "unix"
    max_refresh_interval: float | None = None

    def __init__(
        self,
        socket_path: str,
        signer: ProofSigner,
        *,
        clock: Clock = time.time,
        timeout: float = 5.0,
        require_dpop: bool = True,
        offsets: ClockOffsets | None = None,
    ) -> None:
        self.socket_path = socket_path
        self._session = _session(timeout, aiohttp.UnixConnector(path=socket_path))
        self._client = DPoPTokenClient(
            self._session,
            signer,
            clock=clock,
            require_dpop=require_dpop,
            what=f"broker socket {socket_path}",
            offsets=offsets,
            peer=f"unix:{socket_path}",  # every socket's htu origin is http://localhost
        )

    async def fetch(self, audience: str) -> IssuedToken:
        req = TokenRequest(
            UNIX_TOKEN_URL,
            UNIX_TOKEN_URL,
            attestation_form([audience]),
            wit=audience == WIT_AUDIENCE,
        )
        return await self._client.request(req, audience)

    async def close(self) -> None:
        await self._session.close()


@dataclass(frozen=True, slots=True)
class Discovered:
    token_endpoint: str
    fetched_at: float


def _discovery_urls(issuer: str) -> list[str]:
    """OIDC Discovery §4 (issuer + /.well-known/openid-configuration), then RFC 8414 §3.1
    (the well-known segment goes between the host and the issuer's path)."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    return [
        f"{issuer.rstrip('/')}/.well-known/openid-configuration",
        f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{path}",
    ]


class K8sAttestor:
    """RFC 8693 exchange of a projected service-account token (re-read on every exchange)."""

    kind = "k8s"
    max_refresh_interval: float | None = None

    def __init__(
        self,
        *,
        issuer: str,
        token_file: str,
        signer: ProofSigner,
        clock: Clock = time.time,
        timeout: float = 5.0,
        token_endpoint: str | None = None,
        subject_token_type: str = JWT_TOKEN_TYPE,
        requested_token_type: str | None = None,
        scope: str | None = None,
        client_id: str | None = None,
        require_dpop: bool = True,
        offsets: ClockOffsets | None = None,
        tls: TLSClient | None = None,
    ) -> None:
        self.issuer = issuer
        self.token_file = token_file
        self._clock = clock
        self._fixed_endpoint = token_endpoint
        self._discovered: Discovered | None = None
        self._discovery_lock = asyncio.Lock()
        self._subject_token_type = subject_token_type
        self._requested_token_type = requested_token_type
        self._scope = scope
        self._client_id = client_id
        self._session = _session(timeout)
        self._tls = tls
        self._client = DPoPTokenClient(
            self._session,
            signer,
            clock=clock,
            require_dpop=require_dpop,
            what="token endpoint",
            offsets=offsets,
            tls=tls,
        )

    async def _read_subject_token(self) -> str:
        def read() -> str:
            with open(self.token_file, "rb") as f:
                data = f.read(MAX_SUBJECT_TOKEN_BYTES + 1)
            if len(data) > MAX_SUBJECT_TOKEN_BYTES:
                raise ValueError("larger than 64 KiB")
            return data.decode("ascii").strip()

        try:
            token = await asyncio.to_thread(read)
        except (OSError, ValueError) as exc:
            detail = getattr(exc, "strerror", None) or str(exc)
            raise IdentityError(
                IdentityCode.SUBJECT_TOKEN_UNAVAILABLE, f"cannot read {self.token_file}: {detail}"
            ) from None
        if not token:
            raise IdentityError(
                IdentityCode.SUBJECT_TOKEN_UNAVAILABLE, f"{self.token_file} is empty"
            )
        return token

    async def token_endpoint(self) -> str:
        if self._fixed_endpoint is not None:
            return self._fixed_endpoint
        async with self._discovery_lock:
            found = self._discovered
            if found is not None and self._clock() - found.fetched_at < DISCOVERY_TTL:
                return found.token_endpoint
            endpoint = await self._discover()
            self._discovered = Discovered(endpoint, self._clock())
            return endpoint

    async def _discover(self) -> str:
        last: IdentityError | None = None
        for url in _discovery_urls(self.issuer):
            async with (
                _map_errors(f"discovery {url}"),
                self._session.get(url, **request_options(self._tls)) as resp,
            ):
                if resp.status == 404:
                    last = IdentityError(IdentityCode.DISCOVERY_FAILED, f"{url}: HTTP 404")
                    continue
                if resp.status != 200:
                    raise IdentityError(
                        IdentityCode.DISCOVERY_FAILED,
                        f"{url}: HTTP {resp.status}",
                        status=resp.status,
                    )
                try:
                    doc = await resp.json(content_type=None)
                except ValueError:
                    raise IdentityError(IdentityCode.DISCOVERY_FAILED, f"{url}: not JSON") from None
            return self._check_metadata(doc, url)
        assert last is not None
        raise last

    def _check_metadata(self, doc: object, url: str) -> str:
        if not isinstance(doc, dict):
            raise IdentityError(IdentityCode.DISCOVERY_FAILED, f"{url}: not a JSON object")
        # OIDC Discovery §4.3 / RFC 8414 §3.3: the issuer in the document MUST be identical.
        if doc.get("issuer") != self.issuer:
            raise IdentityError(
                IdentityCode.DISCOVERY_FAILED,
                f"{url}: issuer {doc.get('issuer')!r} is not the configured {self.issuer!r}",
                retryable=False,
            )
        endpoint = doc.get("token_endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            raise IdentityError(IdentityCode.DISCOVERY_FAILED, f"{url}: no http(s) token_endpoint")
        algs = doc.get("dpop_signing_alg_values_supported")
        if isinstance(algs, list) and "ES256" not in algs:
            raise IdentityError(
                IdentityCode.DPOP_UNSUPPORTED,
                f"issuer does not accept ES256 DPoP proofs ({algs})",
                retryable=False,
            )
        grants = doc.get("grant_types_supported")
        if isinstance(grants, list) and "urn:ietf:params:oauth:grant-type:token-exchange" not in (
            grants
        ):
            log.warning("issuer %s does not list token exchange in grant_types_supported", url)
        return endpoint

    async def fetch(self, audience: str) -> IssuedToken:
        subject_token = await self._read_subject_token()  # every time: the kubelet rotates it
        endpoint = await self.token_endpoint()
        parts = urlsplit(endpoint)
        wit = audience == WIT_AUDIENCE  # a WIT has no audience; it is asked for by type
        req = TokenRequest(
            url=endpoint,
            htu=f"{parts.scheme}://{parts.netloc}{parts.path or '/'}",
            form=exchange_form(
                subject_token=subject_token,
                audiences=[] if wit else [audience],
                subject_token_type=self._subject_token_type,
                requested_token_type=WIT_TOKEN_TYPE if wit else self._requested_token_type,
                scope=self._scope,
                client_id=self._client_id,
            ),
            wit=wit,
        )
        try:
            return await self._client.request(req, audience)
        except IdentityError as exc:
            if exc.code in ("unavailable", "timeout") or exc.status == 404:
                self._discovered = None  # the endpoint may have moved: discover again next time
            raise

    async def close(self) -> None:
        await self._session.close()


@dataclass(frozen=True, slots=True)
class _FileState:
    raw: bytes
    token: str
    claims: dict[str, object] | None


class FileAttestor:
    """A token file another agent keeps fresh; re-read when it changes."""

    kind = "file"

    def __init__(
        self,
        path: str,
        signer: ProofSigner,
        *,
        clock: Clock = time.time,
        poll_interval: float = 10.0,
    ) -> None:
        self.path = path
        self._jkt = signer.thumbprint
        self._clock = clock
        self.max_refresh_interval: float | None = poll_interval
        self._state: _FileState | None = None

    async def _load(self) -> _FileState:
        # The file is tiny: reading it and comparing bytes is cheaper and more reliable than
        # trusting mtime (coarse-grained on many filesystems; same-size rewrites happen).
        def read(previous: _FileState | None) -> _FileState:
            with open(self.path, "rb") as f:
                data = f.read(MAX_SUBJECT_TOKEN_BYTES + 1)
            if len(data) > MAX_SUBJECT_TOKEN_BYTES:
                raise ValueError("larger than 64 KiB")
            if previous is not None and previous.raw == data:
                return previous  # unchanged: no re-parse
            token = data.decode("ascii").strip()
            return _FileState(data, token, unverified_claims(token))

        try:
            self._state = await asyncio.to_thread(read, self._state)
        except (OSError, ValueError) as exc:
            detail = getattr(exc, "strerror", None) or str(exc)
            raise IdentityError(
                IdentityCode.SUBJECT_TOKEN_UNAVAILABLE, f"cannot read {self.path}: {detail}"
            ) from None
        return self._state

    async def fetch(self, audience: str) -> IssuedToken:
        state = await self._load()
        now = self._clock()
        claims = state.claims
        if not state.token or claims is None:
            raise IdentityError(
                IdentityCode.BAD_RESPONSE, f"{self.path} does not hold a JWT", retryable=True
            )
        exp = numeric_claim(claims, "exp")
        if exp is None:
            raise IdentityError(
                IdentityCode.BAD_RESPONSE, f"token in {self.path} has no exp", retryable=True
            )
        if exp <= now:
            raise IdentityError(
                IdentityCode.TOKEN_EXPIRED, f"token in {self.path} expired", retryable=True
            )
        auds = audiences_of(claims)
        if auds is not None and audience not in auds:
            raise IdentityError(
                IdentityCode.INVALID_TARGET,
                f"token in {self.path} is not for audience {audience}",
                retryable=True,  # the agent may write another token
            )
        dpop = has_cnf(claims)
        if dpop and bound_jkt(claims) != self._jkt:
            raise IdentityError(
                IdentityCode.BINDING_MISMATCH,
                f"token in {self.path} is bound (cnf) to a key other than this sidecar's",
                retryable=True,
            )
        iat = numeric_claim(claims, "iat")
        return IssuedToken(
            token=state.token,
            token_type="DPoP" if dpop else "Bearer",
            expires_at=exp,
            issued_at=iat if iat is not None and iat <= now else now,
            audience=audience,
            claims=claims,
        )

    async def close(self) -> None:
        return None
