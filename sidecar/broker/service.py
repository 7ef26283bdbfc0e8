"""The broker: request handling (``Broker``, transport-free apart from awaiting its attestors)
and the process around it (``BrokerService``: listeners, key rotation, revocation upkeep).

Order of checks on both token endpoints — cheap and client-fixable first, so a client learns
the first thing it must fix, and so no signature is verified for a request that is malformed:

1. the form (RFC 6749 §3.2, RFC 8693 §2.1): ``invalid_request`` / ``unsupported_grant_type``;
2. the DPoP proof (RFC 9449 §4.3, ``ath`` not required: there is no access token yet) and its
   ``jti`` against the replay cache: ``invalid_dpop_proof``;
3. the workload's identity — the subject token (k8s) or the socket peer (unix) — and its
   registration entry: ``invalid_request`` (k8s) / ``access_denied`` (unix);
4. the requested audiences against the entry: ``invalid_target``;
5. revocation of the subject: ``invalid_request`` (k8s) / ``access_denied`` (unix);
6. mint, audit, answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.authz.replay import InMemoryReplayStore
from sidecar.broker.attestation_k8s import ClusterVerifier, K8sIdentity, SubjectTokenError
from sidecar.broker.attestation_unix import (
    AttestationFailure,
    PeerCreds,
    PeerTracker,
    UnixAttestor,
    UnixEvidence,
    peer_uid,
)
from sidecar.broker.audit import AuditLog
from sidecar.broker.config import BrokerConfig
from sidecar.broker.issuance import MintedToken, mint
from sidecar.broker.keys import KeyEvent, KeyRing, generate_private_key, make_signing_key
from sidecar.broker.metrics import BrokerMetrics
from sidecar.broker.oauth import (
    TOKEN_EXCHANGE_GRANT,
    OAuthError,
    TokenHttpRequest,
    parse_exchange,
    parse_request,
    requests_wit,
    targets,
    token_response,
    wit_response,
)
from sidecar.broker.registry import Entry
from sidecar.broker.revocation import RevocationStore, validate_value
from sidecar.errors import AuthError, ConfigError, ReplayStoreUnavailable
from sidecar.jose.rfc7515_jws import parse_compact
from sidecar.jose.rfc7517_jwk import public_jwk_dict
from sidecar.jose.rfc9449_dpop import ProofKeyCache, VerifiedProof, verify_proof
from sidecar.jose.spiffe_bundle import WIT_SVID
from sidecar.jose.wimse_wit import SVID_ALGORITHMS, issue_wit
from sidecar.net_limits import ADMIN_LIMITS, ConnLimits, GuardedSite, ListenerGuard, server_options

log = logging.getLogger(__name__)

Clock = Callable[[], float]

#: The error for a workload that is identified but refused by policy (no registration entry,
#: revoked). RFC 8693 §2.2.2 fixes it for token exchange: a subject_token "unacceptable based
#: on policy" gets ``invalid_request`` (400). The attestation socket is no token exchange (no
#: subject token: the caller is the socket peer), so there RFC 6749's ``access_denied`` (403)
#: stays.
EXCHANGE_REFUSAL = "invalid_request"
UNIX_REFUSAL = "access_denied"
#: Seconds between attempts to generate the next signing key after one failed.
ROTATION_RETRY = 30.0


def policy_refusal(error: str, description: str, reason: str) -> OAuthError:
    return OAuthError(
        error, description, status=403 if error == "access_denied" else 400, reason=reason
    )


@dataclass(frozen=True, slots=True)
class Issued:
    body: bytes
    minted: MintedToken


@dataclass(slots=True)
class _Attempt:
    """What the audit record of one token request has gathered so far."""

    fields: dict[str, Any] = field(default_factory=dict)
    #: True from the moment the attestor runs until a registration entry matched: a refusal
    #: then counts as an attestation failure.
    attestation_failed: bool = False


@dataclass(frozen=True, slots=True)
class _Attested:
    selectors: frozenset[str]
    unregistered: str  # the refusal's description when no entry matches
    refusal: str  # the error code of a policy refusal (EXCHANGE_REFUSAL / UNIX_REFUSAL)
    audiences: list[str]
    proof: VerifiedProof
    not_after: float | None  # the subject token's expiry, if there is one
    wit: bool = False  # a WIT was asked for (requested_token_type), not an access token


class Broker:
    """Everything a token request needs, with the clock passed in."""

    def __init__(
        self,
        cfg: BrokerConfig,
        *,
        ring: KeyRing,
        clusters: ClusterVerifier,
        unix: UnixAttestor,
        revocations: RevocationStore,
        audit: AuditLog,
        metrics: BrokerMetrics,
        clock: Clock = time.time,
    ) -> None:
        self.cfg = cfg
        self.ring = ring
        self.registry = cfg.registry
        self.clusters = clusters
        self.unix = unix
        self.revocations = revocations
        self.audit = audit
        self.metrics = metrics
        self.clock = clock
        self.replay = InMemoryReplayStore(cfg.replay_capacity)
        self.proof_keys = ProofKeyCache()
        self._save_lock = asyncio.Lock()
        self._jwks: tuple[int, bytes, str] | None = None
        base = cfg.issuer
        self.token_endpoint = f"{base}/token"
        self.discovery = json.dumps(
            {
                "issuer": base,
                "jwks_uri": f"{base}/jwks.json",
                "token_endpoint": self.token_endpoint,
                "grant_types_supported": [TOKEN_EXCHANGE_GRANT],
                "token_endpoint_auth_methods_supported": ["none"],
                "dpop_signing_alg_values_supported": sorted(
                    cfg.dpop.algorithms, key=lambda a: (a != "ES256", a)
                ),
                "subject_types_supported": ["public"],
                # REQUIRED by RFC 8414 §2 and OIDC Discovery §3, and truthfully empty: there is
                # no authorization endpoint, so no response_type exists here. RFC 8414 §3.2
                # would omit an empty claim, contradicting §2 for servers like this one
                # (erratum 7793); present-and-empty satisfies parsers that require the member
                # without advertising a flow that would fail.
                "response_types_supported": [],
                # No ID tokens are issued; discovery-driven JWT verifiers read this member as
                # the algorithms of the issuer's JWTs, so it names the one we sign access tokens
                # with. Not RS256 "because OIDC says so": listing an algorithm we never sign
                # with would only widen those verifiers' allowlists.
                "id_token_signing_alg_values_supported": [cfg.keys.schedule.alg],
                # Our extension: where verifiers poll revoked subjects and jtis.
                "revocation_list_uri": f"{base}/revocations",
            },
            separators=(",", ":"),
        ).encode()

    # -- published documents ----------------------------------------------------------------

    def wit_bundle(self) -> bytes:
        """A SPIFFE bundle (Trust Domain and Bundle §4) of the keys WITs are signed with
        (``use: wit-svid``): the published signing keys; a WIT's ``typ`` keeps it apart from
        an access token signed by the same key."""
        keys = [{**k.public_jwk, "use": WIT_SVID} for k in self.ring.published()]
        doc = {"keys": keys, "spiffe_refresh_hint": self.cfg.keys.jwks_max_age}
        return json.dumps(doc, separators=(",", ":")).encode()

    def jwks(self) -> tuple[bytes, str]:
        cached = self._jwks
        if cached is None or cached[0] != self.ring.version:
            body = self.ring.jwks_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            cached = self._jwks = (self.ring.version, body, etag)
        return cached[1], cached[2]

    # -- shared steps -----------------------------------------------------------------------

    def verify_dpop(self, proofs: Sequence[str], htu: str | None, now: float) -> VerifiedProof:
        """RFC 9449 §5: the token request carries exactly one valid proof for this endpoint."""
        if htu is None:
            raise OAuthError(
                "invalid_request", "a Host header naming host[:port] is required", reason="no_host"
            )
        if not proofs:
            raise OAuthError(
                "invalid_dpop_proof", "a DPoP proof is required", reason="proof_missing"
            )
        if len(proofs) > 1:
            # §4.3 step 1: "there is not more than one DPoP HTTP request header field".
            raise OAuthError(
                "invalid_dpop_proof", "more than one DPoP header", reason="proof_invalid"
            )
        dpop = self.cfg.dpop
        try:
            proof = verify_proof(
                proofs[0],
                method="POST",
                url=htu,
                access_token=None,
                expected_jkt=None,
                now=now,
                policy=dpop,
                key_cache=self.proof_keys,
            )
        except AuthError as exc:
            raise OAuthError("invalid_dpop_proof", exc.detail, reason=exc.reason.value) from None
        try:
            fresh = self.replay.check_and_insert_sync(dpop.replay_key(proof), now, dpop.replay_ttl)
        except ReplayStoreUnavailable:
            raise OAuthError(
                "temporarily_unavailable",
                "too many proofs in flight; retry shortly",
                status=503,
                reason="replay_store_unavailable",
                headers=(("Retry-After", "5"),),
            ) from None
        if not fresh:
            # §11.1: a proof's jti is accepted once within its acceptance window.
            raise OAuthError("invalid_dpop_proof", "proof jti was already used", reason="replayed")
        return proof

    def _allowed(self, entry: Entry, audiences: list[str]) -> None:
        refused = [a for a in audiences if not entry.allows_audience(a)]
        if refused:
            # RFC 8693 §2.2.2: "If the authorization server is unwilling or unable to issue a
            # token for any target service indicated by the resource or audience parameters,
            # the invalid_target error code SHOULD be used".
            raise OAuthError(
                "invalid_target",
                f"{entry.spiffe_id} may not request audience {refused[0]}",
                reason="audience_not_allowed",
            )

    def _not_revoked(self, subject: str, refusal: str) -> None:
        if self.revocations.is_subject_revoked(subject):
            raise policy_refusal(refusal, f"{subject} is revoked", "revoked")

    def _issue(
        self,
        entry: Entry,
        audiences: list[str],
        proof: VerifiedProof,
        now: float,
        not_after: float | None,
    ) -> Issued:
        minted = mint(
            self.ring.active,
            issuer=self.cfg.issuer,
            subject=entry.spiffe_id,
            audiences=audiences,
            jkt=proof.jkt,
            now=now,
            ttl=entry.ttl if entry.ttl is not None else self.cfg.token_ttl,
            not_after=not_after,
        )
        if minted.expires_in <= 0:
            raise OAuthError(
                "invalid_request", "the subject token expires too soon", reason="expired"
            )
        return Issued(token_response(minted.token, minted.expires_in), minted)

    def _issue_wit(self, entry: Entry, proof: VerifiedProof, now: float) -> Issued:
        """A WIT in the SPIFFE WIT-SVID profile for the key that signed the token request's
        DPoP proof (the sidecar's in-memory key): ``sub`` the entry's SPIFFE ID, no ``aud``."""
        key = self.ring.active
        if proof.key is None or proof.alg not in SVID_ALGORITHMS or key.alg not in SVID_ALGORITHMS:
            raise OAuthError(
                "invalid_request",
                "a WIT-SVID needs an RS, ES or PS key for the proof and the issuer (no EdDSA)",
                reason="wit_key_alg",
            )
        wit = issue_wit(
            key.private_key,
            alg=key.alg,
            kid=key.kid,
            subject=entry.spiffe_id,
            workload_jwk=public_jwk_dict(proof.key.key, alg=proof.alg),
            now=now,
            lifetime=self.cfg.wit_ttl,
            issuer=self.cfg.issuer,
        )
        claims = parse_compact(wit, max_bytes=len(wit)).payload
        minted = MintedToken(wit, claims["jti"], key.kid, claims["iat"], claims["exp"])
        return Issued(wit_response(wit, minted.expires_in), minted)

    def _finish(
        self,
        attestor: str,
        started: float,
        now: float,
        *,
        issued: Issued | None = None,
        error: OAuthError | None = None,
        attestation_failed: bool = False,
        fields: dict[str, Any],
    ) -> None:
        elapsed = time.perf_counter() - started
        if issued is not None:
            m = issued.minted
            self.metrics.record(attestor, "issued", elapsed)
            self.audit.emit(
                "issuance",
                now,
                result="ok",
                attestor=attestor,
                jti=m.jti,
                exp=m.exp,
                kid=m.kid,
                **fields,
            )
            return
        assert error is not None
        self.metrics.record(attestor, error.error, elapsed)
        self.metrics.refused(attestor, error.reason)
        if attestation_failed:
            self.metrics.attestation_failed(attestor, error.reason)
        self.audit.emit(
            "attestation_failure" if attestation_failed else "refusal",
            now,
            result="error" if error.status >= 500 else "denied",
            reason=error.reason,
            error=error.error,
            detail=error.description,
            attestor=attestor,
            **fields,
        )

    # -- RFC 8693 token exchange (TCP) ------------------------------------------------------

    async def exchange(self, http: TokenHttpRequest) -> Issued:
        async def attest(attempt: _Attempt, now: float) -> _Attested:
            request = parse_exchange(parse_request(http))
            attempt.fields["aud"] = request.audiences
            proof = self.verify_dpop(http.dpop, http.htu, now)
            attempt.fields["jkt"] = proof.jkt
            attempt.attestation_failed = True
            identity = await self._k8s_identity(request.subject_token, now)
            attempt.fields.update(
                cluster=identity.cluster,
                namespace=identity.namespace,
                service_account=identity.service_account,
                pod=identity.pod,
            )
            unregistered = (
                f"no registration entry for service account {identity.namespace}/"
                f"{identity.service_account} of {identity.cluster}"
            )
            return _Attested(
                identity.selectors,
                unregistered,
                EXCHANGE_REFUSAL,
                request.audiences,
                proof,
                identity.expires_at,
            )

        return await self._issue_attested("k8s", attest)

    async def _k8s_identity(self, token: str, now: float) -> K8sIdentity:
        if len(token) > self.cfg.max_subject_token_bytes:
            raise OAuthError(
                "invalid_request", "subject_token is too large", reason="malformed_token"
            )
        try:
            return await self.clusters.verify(token, now)
        except SubjectTokenError as exc:
            if exc.retryable:
                raise OAuthError(
                    "temporarily_unavailable",
                    exc.detail,
                    status=503,
                    reason=exc.reason,
                    headers=(("Retry-After", "5"),),
                ) from None
            # RFC 8693 §2.2.2: "If the request itself is not valid or if either the
            # subject_token or actor_token are invalid for any reason, or are unacceptable
            # based on policy, the authorization server MUST construct an error response ...
            # The value of the error parameter MUST be the invalid_request error code." So a
            # malformed, expired, not-yet-valid, foreign-issuer, wrong-audience or badly
            # signed subject token is invalid_request, NOT RFC 6749's invalid_grant (which
            # names authorization grants such as codes and refresh tokens). The precise cause
            # is in error_description and in the audit record's reason.
            raise OAuthError(
                "invalid_request",
                f"subject_token rejected ({exc.reason}): {exc.detail}",
                reason=exc.reason,
            ) from None

    # -- Unix attestation (Unix socket) -----------------------------------------------------

    async def attest_unix(
        self, peer: PeerCreds | AttestationFailure, http: TokenHttpRequest
    ) -> Issued:
        async def attest(attempt: _Attempt, now: float) -> _Attested:
            if isinstance(peer, PeerCreds):
                attempt.fields.update(pid=peer.pid, uid=peer.uid, gid=peer.gid)
            form = parse_request(http)
            wit = requests_wit(form)
            audiences = [] if wit else targets(form)
            attempt.fields["aud"] = audiences
            proof = self.verify_dpop(http.dpop, http.htu, now)
            attempt.fields["jkt"] = proof.jkt
            attempt.attestation_failed = True
            evidence = await self._unix_evidence(peer)
            attempt.fields.update(exe=evidence.exe, sha256=evidence.sha256)
            unregistered = (
                f"no registration entry matches this workload (uid={evidence.uid} "
                f"gid={evidence.gid} exe={evidence.exe or 'unreadable'})"
            )
            return _Attested(
                evidence.selectors, unregistered, UNIX_REFUSAL, audiences, proof, None, wit
            )

        return await self._issue_attested("unix", attest)

    async def _issue_attested(
        self, attestor: str, attest: Callable[[_Attempt, float], Awaitable[_Attested]]
    ) -> Issued:
        """One token request, whatever the attestor: ``attest`` parses the request, checks
        the proof and gathers the caller's selectors; then the registration entry, the
        audiences, revocation, issuance — and one audit record and metric either way."""
        started = time.perf_counter()
        now = self.clock()
        attempt = _Attempt()
        try:
            attested = await attest(attempt, now)
            entry = self.registry.match(attested.selectors)
            if entry is None:
                raise policy_refusal(attested.refusal, attested.unregistered, "no_entry")
            attempt.attestation_failed = False
            attempt.fields.update(sub=entry.spiffe_id, entry=entry.index)
            if not attested.wit:
                self._allowed(entry, attested.audiences)
            self._not_revoked(entry.spiffe_id, attested.refusal)
            if attested.wit:
                issued = self._issue_wit(entry, attested.proof, now)
            else:
                issued = self._issue(entry, attested.audiences, attested.proof, now,
                                     attested.not_after)  # fmt: skip
        except OAuthError as exc:
            self._finish(attestor, started, now, error=exc,
                         attestation_failed=attempt.attestation_failed,
                         fields=attempt.fields)  # fmt: skip
            raise
        self._finish(attestor, started, now, issued=issued, fields=attempt.fields)
        self.metrics.granted(attested.audiences, self.cfg.high_privilege_audiences)
        return issued

    async def _unix_evidence(self, peer: PeerCreds | AttestationFailure) -> UnixEvidence:
        try:
            if isinstance(peer, AttestationFailure):
                raise peer
            return await self.unix.attest(peer)
        except AttestationFailure as exc:
            raise OAuthError(
                "access_denied", f"attestation failed: {exc.detail}", status=403, reason=exc.reason
            ) from None

    # -- revocation (admin socket) ----------------------------------------------------------

    async def change_revocation(
        self, kind: str, value: object, *, restore: bool, actor_uid: int
    ) -> dict[str, Any]:
        problem = validate_value(value)
        if problem is not None or kind not in ("sub", "jti"):
            raise OAuthError("invalid_request", f"{kind} must be {problem or 'sub or jti'}")
        assert isinstance(value, str)
        now = self.clock()
        store = self.revocations
        if kind == "sub":
            changed = store.restore_subject(value) if restore else store.revoke_subject(value)
        else:
            changed = store.restore_jti(value) if restore else store.revoke_jti(value, now)
        action = "restore" if restore else "revoke"
        if changed:
            await self.save_revocations()
            self.metrics.revocations_total.labels(kind, action).inc()
        self.audit.emit(
            "revocation",
            now,
            result="ok",
            action=action,
            changed=changed,
            actor_uid=actor_uid,
            **{kind: value},
        )
        published = store.published()
        return {
            "changed": changed,
            "action": action,
            kind: value,
            "subjects": len(store.subjects),
            "jtis": len(store.jtis),
            "etag": published.etag,
        }

    async def save_revocations(self) -> None:
        if self.revocations.state_file is None:
            return
        async with self._save_lock:  # one writer at a time; each writes the latest state
            data = self.revocations.state_bytes()
            await asyncio.to_thread(self.revocations.save_sync, data)


def prepare_unix_socket(path: str, key: str, mode: int) -> socket.socket:
    """Bind a Unix stream socket at ``path`` with ``mode``, in a directory we own.

    The directory is created (0755) if missing. It must be a real directory owned by our
    user and writable by nobody else: otherwise another user could swap the socket for their
    own and impersonate the broker. A stale socket (nobody answering) is removed; a live one
    means another broker runs there."""
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        st = os.lstat(directory)
    except OSError as exc:
        raise ConfigError(
            key, f"a path whose directory can be created ({exc.strerror})", path
        ) from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ConfigError(
            key, "a path in a directory owned by the broker's user and writable by no other", path
        )
    with contextlib.suppress(FileNotFoundError):
        existing = os.lstat(path)
        if not stat.S_ISSOCK(existing.st_mode):
            raise ConfigError(key, "a path that is free or holds a stale socket", path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: its broker is gone
        else:
            raise ConfigError(key, "a socket path no running broker uses", path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
    except OSError as exc:
        sock.close()
        raise ConfigError(key, f"a bindable socket path ({exc.strerror})", path) from None
    sock.setblocking(False)
    return sock


class BrokerService:
    """Runs a Broker: HTTP on TCP, the attestation and admin sockets, background upkeep."""

    def __init__(
        self, cfg: BrokerConfig, registry: CollectorRegistry, *, clock: Clock = time.time
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.metrics = BrokerMetrics(registry)
        self.audit = AuditLog(cfg.audit_path)
        self.revocations = RevocationStore(
            cfg.revocation_state_file, jti_retention=cfg.keys.schedule.retain_for, clock=clock
        )
        self.clusters = ClusterVerifier(
            cfg.clusters, leeway=cfg.subject_leeway, max_bytes=cfg.max_subject_token_bytes
        )
        self.unix = UnixAttestor(needs_sha256=cfg.registry.needs_sha256)
        self.tracker = PeerTracker()
        self.registry = registry
        self.broker: Broker | None = None
        self.http_port: int | None = None
        self._runners: list[web.AppRunner] = []
        self._paths: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []

    def readiness(self) -> tuple[bool, str]:
        if self.broker is None or self.http_port is None:
            return False, "starting"
        missing = self.clusters.missing_keys()
        kid = self.broker.ring.active.kid
        if missing:
            return True, f"ready kid={kid}; no keys yet for cluster(s): {', '.join(missing)}"
        return True, f"ready kid={kid}"

    async def start(self) -> None:
        from sidecar.broker.http_app import make_admin_socket_app, make_public_app, make_unix_app

        cfg = self.cfg
        self.revocations.load()
        # Sockets first: a configuration problem (directory, a broker already running) stops
        # the start before anything slow (key generation, the clusters' keys) or anything
        # listening.
        attestation_sock = None
        if cfg.attestation_socket is not None:
            attestation_sock = prepare_unix_socket(
                cfg.attestation_socket, "attestation.socket", 0o666
            )
            self._paths.append(cfg.attestation_socket)
        admin_sock = prepare_unix_socket(cfg.admin_socket, "admin.socket", 0o600)
        self._paths.append(cfg.admin_socket)
        now = self.clock()
        alg = cfg.keys.schedule.alg
        private = cfg.keys.initial_key
        if private is None:
            private = await asyncio.to_thread(generate_private_key, alg)
        ring = KeyRing(cfg.keys.schedule, make_signing_key(private, alg, now), now)
        self._key_events([KeyEvent("key_activated", ring.active.kid, alg)], now)
        await self.clusters.start()
        broker = Broker(
            cfg,
            ring=ring,
            clusters=self.clusters,
            unix=self.unix,
            revocations=self.revocations,
            audit=self.audit,
            metrics=self.metrics,
            clock=self.clock,
        )
        self.broker = broker
        m = self.metrics
        m.watch_grants(cfg.high_privilege_audiences)
        m.gauge("sidecar_broker_published_keys", "Keys in the JWKS", lambda: len(ring.published()))
        m.gauge(
            "sidecar_broker_revoked", "Revoked subjects and jtis", lambda: len(self.revocations)
        )
        m.gauge("sidecar_broker_replay_entries", "DPoP proof jtis remembered", broker.replay.size)
        m.gauge(
            "sidecar_broker_revocation_waiting",
            "Long-poll requests for the revocation list held right now",
            lambda: self.revocations.waiting,
        )

        sites: list[tuple[web.Application, ListenerGuard, socket.socket | None]] = [
            (
                make_public_app(broker),
                ListenerGuard("broker_http", cfg.http_connections, self.registry),
                None,
            )
        ]
        if attestation_sock is not None:
            # The uid is read before admission (the per-uid cap); the rest of the peer's
            # credentials, with a pidfd, only for an admitted connection.
            attestation = ListenerGuard(
                "broker_attestation",
                cfg.attestation_connections,
                self.registry,
                peer_uid=peer_uid,
                on_open=self.tracker.accepted,
                on_close=self.tracker.lost,
            )
            sites.append((make_unix_app(broker, self.tracker), attestation, attestation_sock))
        admin = ListenerGuard("broker_admin_socket", ADMIN_LIMITS, self.registry)
        sites.append((make_admin_socket_app(broker), admin, admin_sock))
        for app, guard, sock in sites:
            runner = self._runner(app, guard.limits)
            await runner.setup()
            await GuardedSite(runner, guard, cfg.listen if sock is None else sock).start()
            if sock is None:
                self.http_port = next(int(a[1]) for a in runner.addresses if isinstance(a, tuple))
        self._tasks.append(asyncio.create_task(self._rotate(ring)))
        self._tasks.append(asyncio.create_task(self._prune_revocations()))
        # Everything allocated so far lives as long as the process: keep it out of the
        # collector's full passes, which otherwise show up as latency spikes under load.
        gc.freeze()
        log.info(
            "broker issuer=%s kid=%s alg=%s entries=%d clusters=%d",
            cfg.issuer,
            ring.active.kid,
            alg,
            len(cfg.registry.entries),
            len(cfg.clusters),
        )

    def _runner(self, app: web.Application, limits: ConnLimits) -> web.AppRunner:
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=2.0,
            **server_options(limits),
        )
        self._runners.append(runner)
        return runner

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.revocations.close()  # held long-polls answer now, before the listeners close
        await self.clusters.stop()
        for runner in reversed(self._runners):
            await runner.cleanup()
        for path in self._paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.audit.close()

    def _key_events(self, events: list[KeyEvent], now: float) -> None:
        for ev in events:
            self.metrics.key_events.labels(ev.event.removeprefix("key_")).inc()
            self.audit.emit(ev.event, now, result="ok", kid=ev.kid, alg=ev.alg)
            log.info("%s kid=%s alg=%s", ev.event.replace("_", " "), ev.kid, ev.alg)

    async def _rotate(self, ring: KeyRing) -> None:
        """Generate, publish, activate and retire keys on the schedule (see keys.py)."""
        while True:
            now = self.clock()
            if ring.next_key_due(now):
                try:
                    private = await asyncio.to_thread(generate_private_key, ring.schedule.alg)
                except Exception as exc:
                    # Keep serving with the active key and try again shortly; the alert on
                    # this outcome pages before the active key is retired.
                    self.metrics.key_rotations.labels("failed").inc()
                    log.error("signing key generation failed: %s", type(exc).__name__)
                    await asyncio.sleep(ROTATION_RETRY)
                    continue
                self.metrics.key_rotations.labels("ok").inc()
                now = self.clock()
                key = make_signing_key(private, ring.schedule.alg, now)
                self._key_events([ring.publish_next(key, now)], now)
            now = self.clock()
            self._key_events(ring.advance(now), now)
            await asyncio.sleep(min(max(ring.next_wakeup(self.clock()), 0.05), 60.0))

    async def _prune_revocations(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, max(1.0, self.revocations.jti_retention / 10)))
            if self.revocations.prune(self.clock()) and self.broker is not None:
                try:
                    await self.broker.save_revocations()
                except OSError as exc:  # pragma: no cover - disk trouble: keep serving
                    log.error("cannot save revocations: %s", exc)
