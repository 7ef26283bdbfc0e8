"""The ext_authz decision core: RequestView in, Decision out. No sockets, no transport types.

Phases (each a small method): route → extract credentials → verify access token →
verify proof → nonce → revocation → policy → replay → response. The only I/O (a key refresh,
an asynchronous replay store) is yielded by :meth:`Authorizer.decision_flow` for a driver to do.
Every failure is an AuthError carrying a reason code; anything else escaping ``evaluate`` is a
bug, and the transports turn it into a fail-closed deny.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

from sidecar.authz.decision import Allow, Decision, Deny, Header, Identity, RequestView
from sidecar.authz.decision_cache import Cached, DecisionCache
from sidecar.authz.nonce import NonceService
from sidecar.authz.policy import Policy, Route, Rule, canonical_path
from sidecar.authz.replay import ReplayStore
from sidecar.authz.revocation import RevocationList
from sidecar.authz.target import RequestTarget
from sidecar.authz.token_cache import VerifiedTokenCache
from sidecar.authz.trust_domains import TrustBundles, refresh_target
from sidecar.authz.wimse import WimseSettings, wimse_deny_shape
from sidecar.authz.wimse import verify_request as verify_wimse
from sidecar.errors import (
    NONCE_REASONS,
    PROOF_REASONS,
    AuthError,
    Reason,
    ReplayStoreUnavailable,
    status_for,
)
from sidecar.jose.jwks import KeyStore
from sidecar.jose.rfc7515_jws import CompactJWS
from sidecar.jose.rfc9068_access_token import IssuerPolicy, VerifiedToken, verify_access_token
from sidecar.jose.rfc9449_dpop import DPoPPolicy, ProofKeyCache, VerifiedProof, verify_proof
from sidecar.jose.spiffe_jwt_svid import verify_jwt_svid
from sidecar.jose.wimse_wit import WitKeys

IDENTITY_PREFIX = "x-workload-"
#: Longest Authorization value + raw path whose bearer allow is cached: an entry's size is
#: bounded (a caller with one valid token and many long paths cannot fill memory).
DECISION_KEY_MAX = 2048
#: Removed from every allowed request: the credentials, and the method-override headers some
#: frameworks honour, which would let the app run another method than the one allowed.
STRIPPED = (
    "authorization",
    "dpop",
    "workload-identity-token",
    "workload-proof-token",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
)


@dataclass(frozen=True, slots=True)
class AuthzSettings:
    audiences: frozenset[str]
    issuers: Mapping[str, IssuerPolicy]
    leeway: float = 5.0
    #: SPIFFE trust domains whose JWT-SVIDs are accepted: name → allowed algorithms.
    trust_domains: Mapping[str, frozenset[str]] = field(default_factory=dict)
    dpop: DPoPPolicy = field(default_factory=DPoPPolicy)
    #: Normalized origins this service answers to (``target.parse_authority``); empty: the
    #: request's own origin (Host, connection scheme) is what a proof's htu must name.
    authorities: frozenset[str] = frozenset()
    max_token_bytes: int = 8192
    token_cache_size: int = 10_000
    proof_key_cache_size: int = 4096
    #: ``auth: wimse`` routes: WIT keys, profile, proof lifetime and carriage.
    wimse: WimseSettings = field(default_factory=WimseSettings)


class PendingAllow(NamedTuple):
    """Everything verified; the proof's (jkt, jti) still has to be recorded as used. A named
    tuple: one is built per allowed check (see ``sidecar.authz.decision``)."""

    replay_key: str
    ttl: float
    allow: Allow
    route: Route
    scheme: str
    metadata: Mapping[str, Any]
    proof_iat: float = 0.0
    #: The access token's ``exp`` for a bearer allow (how long the decision cache may keep it).
    token_exp: float = 0.0


@dataclass(frozen=True, slots=True)
class RefreshKeys:
    """I/O the flow needs: refresh ``issuer``'s keys (an unknown ``kid``); answer: changed?"""

    issuer: str


@dataclass(frozen=True, slots=True)
class ReplayInsert:
    """I/O the flow needs: record a proof in an asynchronous store; answer: was it new?"""

    key: str
    now: float
    ttl: float


IORequest = RefreshKeys | ReplayInsert


DecisionFlow = Generator[IORequest, Any, Decision]
#: Where a check stands: the I/O it waits for, or its decision.
Step = IORequest | Decision


def advance(flow: DecisionFlow, reply: Any = None, error: Exception | None = None) -> Step:
    """Resume ``flow`` with the answer to its last I/O request (or the error it raised): the
    next I/O request, or the decision. Every driver (event loop, worker thread) uses this."""
    try:
        return flow.throw(error) if error is not None else flow.send(reply)
    except StopIteration as done:
        return cast(Decision, done.value)


def _quoted(text: str) -> str:
    # RFC 9110 quoted-string: keep error_description to safe printable ASCII.
    return "".join(c for c in text if 0x20 <= ord(c) < 0x7F and c not in '"\\')


class Authorizer:
    def __init__(
        self,
        settings: AuthzSettings,
        *,
        keys: KeyStore,
        policy: Policy,
        replay: ReplayStore,
        nonces: NonceService | None = None,
        revocations: RevocationList | None = None,
        clock: Callable[[], float] = time.time,
        on_unknown_key: Callable[[str], Awaitable[bool]] | None = None,
        bundles: TrustBundles | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.bundles = bundles if bundles is not None else TrustBundles()
        self._other_profile = self._verify_svid if settings.trust_domains else None
        self.policy = policy
        self.replay = replay
        self.nonces = nonces
        self.revocations = revocations if revocations is not None else RevocationList()
        self.clock = clock
        self.on_unknown_key = on_unknown_key
        self.token_cache = VerifiedTokenCache(settings.token_cache_size, leeway=settings.leeway)
        #: Cached-bearer allows per exact request (sidecar.authz.decision_cache), bounded
        #: like the verified tokens.
        self.decisions: DecisionCache[PendingAllow] = DecisionCache(settings.token_cache_size)
        self.proof_keys = ProofKeyCache(settings.proof_key_cache_size)
        self.target = RequestTarget(settings.authorities)
        # A store that answers without I/O (in-memory, LMDB) is called inline, no yield.
        self._sync_replay: Callable[[str, float, float], bool] | None = getattr(
            replay, "check_and_insert_sync", None
        )
        algs = " ".join(sorted(settings.dpop.algorithms))
        self._dpop_challenge = f'DPoP algs="{algs}"'
        needs_nonce = any(r.nonce for r in policy.routes) or policy.default_route.nonce
        #: Keys for WITs: the ``wit-svid`` keys of the trust domains' bundles.
        self.wit_keys: WitKeys = self.bundles
        if needs_nonce and nonces is None:
            raise ValueError("a route requires DPoP nonces but no NonceService was given")

    # -- entry points ---------------------------------------------------------------------

    async def decide(self, view: RequestView, now: float | None = None) -> Decision:
        """The full decision, including the replay store round trip."""
        flow = self.decision_flow(view, self.clock() if now is None else now)
        step = advance(flow)
        while isinstance(step, IORequest):
            try:
                step = advance(flow, await self.perform(step))
            except ReplayStoreUnavailable as exc:
                step = advance(flow, error=exc)
        return step

    async def perform(self, io: IORequest) -> Any:
        """Carry out one I/O request of :meth:`decision_flow`."""
        if isinstance(io, RefreshKeys):
            assert self.on_unknown_key is not None
            return await self.on_unknown_key(io.issuer)
        return await self.replay.check_and_insert(io.key, io.now, io.ttl)

    def decision_flow(self, view: RequestView, now: float) -> DecisionFlow:
        """The decision as a sans-IO flow: it yields the I/O it needs (a key refresh, an
        asynchronous replay-store insert) and is sent the results, so an event loop
        (:meth:`decide`) and a worker thread (the threaded gRPC engine) drive one logic.
        A replay store failure is thrown into the flow as ``ReplayStoreUnavailable``."""
        return self._flow(view, now, self.evaluate(view, now))

    def start(self, view: RequestView, now: float) -> tuple[DecisionFlow | None, Step]:
        """:meth:`decision_flow` run up to its first I/O request: ``(flow, step)``. Most checks
        need no I/O (a bearer allow, a deny, a proof recorded in a synchronous store): they
        come back decided with no flow, without building a generator for them."""
        result = self.evaluate(view, now)
        if isinstance(result, Deny):
            if not self._wants_refresh(result):
                return None, result
        elif not result.replay_key:
            return None, result.allow
        elif self._sync_replay is not None:
            return None, self._record_sync(result, now)
        flow = self._flow(view, now, result)
        return flow, advance(flow)

    def _wants_refresh(self, result: Deny) -> bool:
        return (
            result.reason is Reason.UNKNOWN_KEY
            and self.on_unknown_key is not None
            and "iss" in result.metadata
        )

    def _flow(self, view: RequestView, now: float, result: Deny | PendingAllow) -> DecisionFlow:
        if (
            isinstance(result, Deny)
            and self._wants_refresh(result)
            and (yield RefreshKeys(result.metadata["iss"]))
        ):
            result = self.evaluate(view, now)  # the key set changed: one more try
        if isinstance(result, Deny):
            return result
        if not result.replay_key:
            return result.allow  # bearer: no proof, nothing to record
        if self._sync_replay is not None:
            return self._record_sync(result, now)
        try:
            fresh = yield ReplayInsert(result.replay_key, now, result.ttl)
        except ReplayStoreUnavailable as exc:
            return self._store_unavailable(result, now, exc)
        return self._recorded(result, now, fresh)

    def _record_sync(self, result: PendingAllow, now: float) -> Decision:
        """The replay insert into a store that answers without I/O (in-memory, LMDB)."""
        assert self._sync_replay is not None
        try:
            fresh = self._sync_replay(result.replay_key, now, result.ttl)
        except ReplayStoreUnavailable as exc:
            return self._store_unavailable(result, now, exc)
        return self._recorded(result, now, fresh)

    def _store_unavailable(
        self, result: PendingAllow, now: float, exc: ReplayStoreUnavailable
    ) -> Deny:
        return self._deny(
            Reason.REPLAY_STORE_UNAVAILABLE,
            str(exc),
            result.route,
            result.scheme,
            now,
            result.metadata,
        )

    def _recorded(self, result: PendingAllow, now: float, fresh: bool) -> Decision:
        """The decision once the proof's replay key is recorded (``fresh``: it was new)."""
        if not fresh:
            return self._deny(
                Reason.REPLAYED,
                "this DPoP proof was already used",
                result.route,
                result.scheme,
                now,
                result.metadata,
            )
        # The store forgot what it saw before its epoch (a restart): refuse what may predate it.
        # Read after the insert: an external store reports its restart in that same answer.
        if self.settings.dpop.predates(result.proof_iat, self.replay.epoch):
            return self._deny(
                Reason.PROOF_PREDATES_RESTART,
                "the replay store restarted after this proof could have been used",
                result.route,
                result.scheme,
                now,
                result.metadata,
                retry_after=max(1, math.ceil(self.restart_guard_until() - now)),
            )
        return result.allow

    def evaluate(self, view: RequestView, now: float) -> Deny | PendingAllow:
        """Everything that needs no I/O. Raises only on bugs."""
        auth_header = view.headers.get("authorization", "")
        cache_key: tuple[str, str, str] | None = None
        generation = self.keys.generation + self.bundles.generation
        if (
            auth_header[:7].lower() == "bearer "
            and len(auth_header) + len(view.path) <= DECISION_KEY_MAX
            # The caller's own x-workload-* headers change what the allow strips (and no
            # honest caller sends them): such a request is always decided.
            and not any(h.startswith(IDENTITY_PREFIX) for h in view.headers)
        ):
            cache_key = (auth_header, view.method, view.path)
            hit = self.decisions.get(
                cache_key,
                policy=self.policy,
                settings=self.settings,
                generation=generation,
                now=now,
            )
            if hit is not None and not self.revocations.is_revoked(hit.subject, hit.jti):
                return hit.value
        result = self._evaluate(view, now, auth_header)
        if (
            cache_key is not None
            and isinstance(result, PendingAllow)
            and result.scheme == "bearer"
            and not result.replay_key
            and not result.route.nonce
        ):
            identity = result.allow.identity
            self.decisions.put(
                cache_key,
                Cached(
                    result,
                    policy=self.policy,
                    settings=self.settings,
                    generation=generation,
                    until=result.token_exp + self.settings.leeway,
                    subject=identity.subject,
                    jti=identity.token_jti,
                ),
            )
        return result

    def _evaluate(self, view: RequestView, now: float, auth_header: str) -> Deny | PendingAllow:
        path = canonical_path(view.path)
        if path is None:
            route = self.policy.default_route
            return self._deny(
                Reason.POLICY_DENIED, "ambiguous request path", route, "dpop", now, {}
            )
        route = self.policy.route_for(path)
        if route.auth == "wimse":
            return self._evaluate_wimse(view, route, path, now)
        # Known before parsing so that a rejected Bearer header gets a Bearer challenge.
        scheme = "bearer" if auth_header[:7].lower() == "bearer " else "dpop"
        meta: dict[str, Any] = {}
        try:
            scheme, token = self._extract(view)
            verified = self._verify_token(token, now, meta)
            proof = self._verify_binding(view, route, scheme, token, verified, now)
            if proof is not None:
                meta["proof_jti"] = proof.jti
                self._check_nonce(route, proof, now)
            rule = self._admit(verified.subject, verified.jti, view.method, path, "token")
        except AuthError as err:
            return self._deny(err.reason, err.detail, route, scheme, now, meta)
        allow = self._allow(view, route, verified, proof, rule.name, now, meta)
        if proof is None:
            # Bearer: nothing to record. A PendingAllow with no key keeps one code path.
            return PendingAllow("", 0.0, allow, route, scheme, meta, token_exp=verified.expires_at)
        dpop = self.settings.dpop
        return PendingAllow(
            dpop.replay_key(proof), dpop.replay_ttl, allow, route, scheme, meta, proof.iat
        )

    def _admit(
        self, subject: str, jti: str | None, method: str, path: str, credential: str
    ) -> Rule:
        """Revocation, then policy: the same for every kind of credential."""
        if self.revocations.is_revoked(subject, jti):
            raise AuthError(Reason.REVOKED, f"{credential} or subject has been revoked")
        rule = self.policy.allowing_rule(subject, method, path)
        if rule is None:
            raise AuthError(Reason.POLICY_DENIED, "no rule allows this caller here")
        return rule

    def _evaluate_wimse(
        self, view: RequestView, route: Route, path: str, now: float
    ) -> Deny | PendingAllow:
        """An ``auth: wimse`` route: WIT then WPT (``sidecar.authz.wimse``), revocation,
        policy; the WPT's jti is then recorded per sender like a DPoP proof's."""
        meta: dict[str, Any] = {}
        try:
            creds = verify_wimse(
                view,
                settings=self.settings.wimse,
                keys=self.wit_keys,
                target=self.target,
                now=now,
                meta=meta,
            )
            wit = creds.wit
            rule = self._admit(wit.subject, wit.jti, view.method, path, "WIT")
        except AuthError as err:
            return self._deny(err.reason, err.detail, route, meta["scheme"], now, meta)
        identity = Identity(
            subject=wit.subject,
            issuer=wit.issuer or wit.trust_domain,
            auth="wimse",
            jkt=wit.key.thumbprint,
            client_id=None,
            token_jti=wit.jti,
            rule=rule.name,
        )
        allow = self._grant(view, route, identity, now, meta)
        wpt = self.settings.wimse.wpt
        # The restart guard reads proof_iat with the DPoP window: give it the earliest instant
        # this WPT was acceptable (from its iat, else exp - lifetime - leeway) in those terms.
        usable_from = wpt.usable_from(creds.wpt.exp, creds.wpt.iat)
        iat_equivalent = usable_from + self.settings.dpop.future_leeway
        scheme = meta["scheme"]
        return PendingAllow(
            creds.wpt.replay_key, wpt.replay_ttl, allow, route, scheme, meta, iat_equivalent
        )

    def restart_guard_until(self) -> float:
        """When a proof signed on a synchronized clock passes the restart guard again."""
        return self.settings.dpop.passes_after(self.replay.epoch)

    # -- phases ---------------------------------------------------------------------------

    def _extract(self, view: RequestView) -> tuple[str, str]:
        value = view.headers.get("authorization")
        if value is None:
            raise AuthError(Reason.MISSING_CREDENTIALS, "no Authorization header")
        if len(value) > self.settings.max_token_bytes + 16:
            raise AuthError(Reason.MALFORMED_TOKEN, "Authorization header too large")
        raw_scheme, _, token = value.strip().partition(" ")
        scheme = raw_scheme.lower()
        if scheme not in ("dpop", "bearer"):
            raise AuthError(
                Reason.MISSING_CREDENTIALS, "Authorization scheme is not DPoP or Bearer"
            )
        token = token.strip()
        if not token or "," in token or " " in token or not token.isascii():
            # A comma means two Authorization headers were merged (or junk): refuse both.
            raise AuthError(Reason.MALFORMED_TOKEN, "not exactly one access token")
        return scheme, token

    def _verify_token(self, token: str, now: float, meta: dict[str, Any]) -> VerifiedToken:
        generation = self.keys.generation + self.bundles.generation
        verified = self.token_cache.get(token, generation)
        if verified is None:
            try:
                verified = verify_access_token(
                    token,
                    issuers=self.settings.issuers,
                    keys=self.keys,
                    audiences=self.settings.audiences,
                    now=now,
                    leeway=self.settings.leeway,
                    max_bytes=self.settings.max_token_bytes,
                    other_profile=self._other_profile,
                )
            except AuthError as err:
                if err.reason is Reason.UNKNOWN_KEY:
                    meta["iss"] = refresh_target(token, self.settings.issuers)
                raise
            self.token_cache.put(token, verified, generation, now)
        elif now >= verified.expires_at + self.settings.leeway:
            self.token_cache.discard(token)
            raise AuthError(Reason.EXPIRED, "token has expired")
        meta["sub"] = verified.subject
        meta["iss"] = verified.issuer
        if verified.jti is not None:
            meta["token_jti"] = verified.jti
        if verified.kid is not None:
            meta["kid"] = verified.kid
        return verified

    def _verify_svid(self, jws: CompactJWS, now: float) -> VerifiedToken | None:
        return verify_jwt_svid(
            jws,
            algorithms=self.settings.trust_domains,
            bundles=self.bundles,
            audiences=self.settings.audiences,
            now=now,
            leeway=self.settings.leeway,
        )

    def _verify_binding(
        self,
        view: RequestView,
        route: Route,
        scheme: str,
        token: str,
        verified: VerifiedToken,
        now: float,
    ) -> VerifiedProof | None:
        if scheme == "bearer":
            if verified.jkt is not None:
                # RFC 9449 §7.2: a DPoP-bound token must not be accepted as a bearer token.
                raise AuthError(Reason.BEARER_NOT_ALLOWED, "DPoP-bound token sent as Bearer")
            if route.auth != "bearer":
                raise AuthError(Reason.BEARER_NOT_ALLOWED, "this route requires DPoP")
            return None
        if verified.jkt is None:
            raise AuthError(
                Reason.PROOF_KEY_MISMATCH, "access token is not DPoP-bound (no cnf.jkt)"
            )
        proof = view.headers.get("dpop")
        if proof is None:
            raise AuthError(Reason.PROOF_MISSING, "no DPoP header")
        if "," in proof:
            # RFC 9449 §4.3 step 1: not more than one DPoP header field.
            raise AuthError(Reason.PROOF_INVALID, "more than one DPoP header")
        return verify_proof(
            proof.strip(),
            method=view.method,
            url=view.url,
            access_token=token,
            expected_jkt=verified.jkt,
            now=now,
            policy=self.settings.dpop,
            key_cache=self.proof_keys,
            check_htu=lambda htu: self.target.check(htu, view),
        )

    def _check_nonce(self, route: Route, proof: VerifiedProof, now: float) -> None:
        if not route.nonce:
            return
        assert self.nonces is not None
        if proof.nonce is None:
            raise AuthError(Reason.NONCE_REQUIRED, "this resource requires a DPoP nonce")
        if not self.nonces.check(proof.nonce, now):
            raise AuthError(Reason.NONCE_INVALID, "DPoP nonce is invalid or stale")

    # -- responses ------------------------------------------------------------------------

    def _allow(
        self,
        view: RequestView,
        route: Route,
        token: VerifiedToken,
        proof: VerifiedProof | None,
        rule: str,
        now: float,
        meta: dict[str, Any],
    ) -> Allow:
        auth = "dpop" if proof is not None else "bearer"
        identity = Identity(
            subject=token.subject,
            issuer=token.issuer,
            auth=auth,
            jkt=proof.jkt if proof else None,
            client_id=token.client_id,
            token_jti=token.jti,
            rule=rule,
        )
        return self._grant(view, route, identity, now, meta)

    def _grant(
        self, view: RequestView, route: Route, identity: Identity, now: float, meta: dict[str, Any]
    ) -> Allow:
        to_set: list[Header] = [
            ("x-workload-id", identity.subject),
            ("x-workload-issuer", identity.issuer),
            ("x-workload-auth", identity.auth),
        ]
        if identity.jkt is not None:
            to_set.append(("x-workload-jkt", identity.jkt))
        if identity.client_id is not None:
            to_set.append(("x-workload-client-id", identity.client_id))
        # Identity headers the caller sent itself are spoofed by definition: drop them (the
        # ones set here replace theirs anyway).
        spoofed = [h for h in view.headers if h.startswith(IDENTITY_PREFIX)]
        remove: tuple[str, ...] = STRIPPED
        if spoofed:
            ours = {name for name, _ in to_set}
            remove += tuple(h for h in spoofed if h not in ours)
        response: tuple[Header, ...] = ()
        if route.nonce and self.nonces is not None:
            response = (("dpop-nonce", self.nonces.issue(now)),)
        meta["rule"] = identity.rule
        meta["auth"] = identity.auth
        return Allow(identity, tuple(to_set), remove, response, meta)

    def _deny(
        self,
        reason: Reason,
        detail: str,
        route: Route,
        scheme: str,
        now: float,
        meta: Mapping[str, Any],
        retry_after: int = 1,
    ) -> Deny:
        status = status_for(reason)
        headers: list[Header] = [
            ("x-authz-reason", reason.value),
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
        ]
        desc = _quoted(detail)
        if scheme.startswith("wimse"):
            status, error, challenge = wimse_deny_shape(reason, status, scheme, desc)
            if challenge:
                headers.append(("www-authenticate", challenge))
        else:
            error = self._oauth_challenge(reason, status, route, scheme, desc, meta, headers, now)
        if status == 503:
            headers.append(("retry-after", str(retry_after)))
        body = json.dumps(
            {"error": error or reason.value, "reason": reason.value, "detail": detail}
        )
        metadata = dict(meta)
        metadata["reason"] = reason.value
        if reason is Reason.POLICY_DENIED:
            metadata["route"] = route.prefix  # M9: policy denies per configured route
        return Deny(status, reason, detail, tuple(headers), body, metadata)

    def _oauth_challenge(
        self,
        reason: Reason,
        status: int,
        route: Route,
        scheme: str,
        desc: str,
        meta: Mapping[str, Any],
        headers: list[Header],
        now: float,
    ) -> str:
        """The ``error`` code, and the Bearer / DPoP challenge headers (RFC 6750 §3,
        RFC 9449 §7.1) of a deny on a DPoP or bearer route."""
        if reason in NONCE_REASONS:
            error = "use_dpop_nonce"
        elif reason in PROOF_REASONS:
            error = "invalid_dpop_proof"
        elif status == 401 and reason is not Reason.MISSING_CREDENTIALS:
            error = "invalid_token"
        elif status == 403:
            error = "insufficient_scope"
        else:
            error = ""
        if status == 403 and meta.get("sub"):
            # RFC 6750 §3.1 / RFC 9449 §7.1: the caller authenticated but may not do this
            # (a path refused before any credential was checked gets no challenge).
            challenge = "Bearer" if scheme == "bearer" else self._dpop_challenge
            sep = " " if scheme == "bearer" else ", "
            headers.append(
                ("www-authenticate", f'{challenge}{sep}error="{error}", error_description="{desc}"')
            )
        if status == 401:
            if reason is Reason.MISSING_CREDENTIALS:
                challenges = [self._dpop_challenge]
                if route.auth == "bearer":
                    challenges.insert(0, "Bearer")
            elif scheme == "bearer" and reason is not Reason.BEARER_NOT_ALLOWED:
                challenges = [f'Bearer error="{error}", error_description="{desc}"']
            else:
                challenges = [
                    f'{self._dpop_challenge}, error="{error}", error_description="{desc}"'
                ]
            headers.append(("www-authenticate", ", ".join(challenges)))
            if reason in NONCE_REASONS and self.nonces is not None:
                headers.append(("dpop-nonce", self.nonces.issue(now)))
        return error

    def internal_error(self, detail: str) -> Deny:
        """The deny the transports send when ``decide`` itself failed (a bug): fail closed."""
        return self._deny(Reason.INTERNAL_ERROR, detail, self.policy.default_route, "dpop", 0.0, {})
