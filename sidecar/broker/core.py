"""The broker's decisions (``Broker``): attest, issue, exchange, revoke. No sockets, no HTTP
types, no files; the clock is passed in, and the only awaits are the attestors' (a subject
token's keys, a peer's executable) and the revocation store's save. The process around it
(listeners, key rotation, upkeep) is ``service.py``; the HTTP adapters are ``http_app.py``.

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

import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.authz.replay import InMemoryReplayStore
from sidecar.broker.attestation_k8s import ClusterVerifier, K8sIdentity, SubjectTokenError
from sidecar.broker.attestation_unix import (
    AttestationFailure,
    PeerCreds,
    UnixAttestor,
    UnixEvidence,
)
from sidecar.broker.audit import AuditLog
from sidecar.broker.codes import BrokerReason, OAuthCode, from_jose
from sidecar.broker.config import BrokerConfig
from sidecar.broker.entries import EntryStore
from sidecar.broker.issuance import MintedToken, mint
from sidecar.broker.keys import KeyRing
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
from sidecar.broker.registry import Entry, Registry
from sidecar.broker.revocation import RevocationStore, validate_value
from sidecar.errors import AuthError, ConfigError, ReplayStoreUnavailable
from sidecar.jose.rfc7515_jws import parse_compact
from sidecar.jose.rfc7517_jwk import public_jwk_dict
from sidecar.jose.rfc9449_dpop import ProofKeyCache, VerifiedProof, verify_proof
from sidecar.jose.spiffe_bundle import WIT_SVID
from sidecar.jose.wimse_wit import SVID_ALGORITHMS, issue_wit

Clock = Callable[[], float]

#: The error for a workload that is identified but refused by policy (no registration entry,
#: revoked). RFC 8693 §2.2.2 fixes it for token exchange: a subject_token "unacceptable based
#: on policy" gets ``invalid_request`` (400). The attestation socket is no token exchange (no
#: subject token: the caller is the socket peer), so there RFC 6749's ``access_denied`` (403)
#: stays.
EXCHANGE_REFUSAL = OAuthCode.INVALID_REQUEST
UNIX_REFUSAL = OAuthCode.ACCESS_DENIED


def policy_refusal(error: OAuthCode, description: str, reason: BrokerReason) -> OAuthError:
    return OAuthError(
        error, description, status=403 if error is OAuthCode.ACCESS_DENIED else 400, reason=reason
    )


@dataclass(frozen=True, slots=True)
class Issued:
    body: bytes
    minted: MintedToken


@dataclass(frozen=True, slots=True)
class _Wanted:
    """What a token request asks for, parsed before any signature is checked."""

    audiences: list[str]
    wit: bool = False  # a WIT was asked for (requested_token_type), not an access token
    subject_token: str | None = None  # k8s only


@dataclass(frozen=True, slots=True)
class _Caller:
    """Who the attestor found: the selectors an entry must match, and the audit fields."""

    selectors: frozenset[str]
    fields: dict[str, Any]
    unregistered: str  # the refusal's description when no entry matches
    not_after: float | None = None  # the subject token's expiry, if there is one


@dataclass(frozen=True, slots=True)
class _Attestor:
    """The attestor-specific steps of a token request (see ``Broker._issue_attested``)."""

    name: str
    refusal: OAuthCode  # the error code of a policy refusal (EXCHANGE_REFUSAL / UNIX_REFUSAL)
    fields: dict[str, Any]  # audit fields known before the request is parsed
    parse: Callable[[TokenHttpRequest], _Wanted]
    identify: Callable[[_Wanted, float], Awaitable[_Caller]]


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
        entries: EntryStore | None = None,
        clock: Clock = time.time,
        timer: Clock = time.perf_counter,
    ) -> None:
        self.cfg = cfg
        self.ring = ring
        self.entries = entries or EntryStore(cfg.registry, [c.issuer for c in cfg.clusters], None)
        self.clusters = clusters
        self.unix = unix
        self.revocations = revocations
        self.audit = audit
        self.metrics = metrics
        self.clock = clock
        self.timer = timer  # monotonic, for the latency metric only
        self.replay = InMemoryReplayStore(cfg.replay_capacity)
        self.proof_keys = ProofKeyCache()
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

    @property
    def registry(self) -> Registry:
        return self.entries.registry

    def use_config(self, cfg: BrokerConfig, registry: Registry) -> None:
        """Take a reloaded configuration whose restart-only settings the service found
        unchanged; ``registry`` is its entries plus those added at run time. No await: a
        request sees the old settings or the new ones."""
        self.cfg = cfg
        self.entries.use_configured(cfg.registry, registry)
        self.unix.needs_sha256 = registry.needs_sha256
        # Retired keys and revoked jtis stay as long as the longest token may now live.
        self.ring.schedule = cfg.keys.schedule
        self.revocations.jti_retention = cfg.keys.schedule.retain_for
        self.metrics.watch_grants(cfg.high_privilege_audiences)

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
                OAuthCode.INVALID_REQUEST,
                "a Host header naming host[:port] is required",
                reason=BrokerReason.NO_HOST,
            )
        if not proofs:
            raise OAuthError(
                OAuthCode.INVALID_DPOP_PROOF,
                "a DPoP proof is required",
                reason=BrokerReason.PROOF_MISSING,
            )
        if len(proofs) > 1:
            # §4.3 step 1: "there is not more than one DPoP HTTP request header field".
            raise OAuthError(
                OAuthCode.INVALID_DPOP_PROOF,
                "more than one DPoP header",
                reason=BrokerReason.PROOF_INVALID,
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
            reason = from_jose(exc.reason, BrokerReason.PROOF_INVALID)
            raise OAuthError(OAuthCode.INVALID_DPOP_PROOF, exc.detail, reason=reason) from None
        try:
            fresh = self.replay.check_and_insert_sync(dpop.replay_key(proof), now, dpop.replay_ttl)
        except ReplayStoreUnavailable:
            raise OAuthError(
                OAuthCode.TEMPORARILY_UNAVAILABLE,
                "too many proofs in flight; retry shortly",
                status=503,
                reason=BrokerReason.REPLAY_STORE_UNAVAILABLE,
                headers=(("Retry-After", "5"),),
            ) from None
        if not fresh:
            # §11.1: a proof's jti is accepted once within its acceptance window.
            raise OAuthError(
                OAuthCode.INVALID_DPOP_PROOF,
                "proof jti was already used",
                reason=BrokerReason.REPLAYED,
            )
        return proof

    def _allowed(self, entry: Entry, audiences: list[str]) -> None:
        refused = [a for a in audiences if not entry.allows_audience(a)]
        if refused:
            # RFC 8693 §2.2.2: "If the authorization server is unwilling or unable to issue a
            # token for any target service indicated by the resource or audience parameters,
            # the invalid_target error code SHOULD be used".
            raise OAuthError(
                OAuthCode.INVALID_TARGET,
                f"{entry.spiffe_id} may not request audience {refused[0]}",
                reason=BrokerReason.AUDIENCE_NOT_ALLOWED,
            )

    def _not_revoked(self, subject: str, refusal: OAuthCode) -> None:
        if self.revocations.is_subject_revoked(subject):
            raise policy_refusal(refusal, f"{subject} is revoked", BrokerReason.REVOKED)

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
                OAuthCode.INVALID_REQUEST,
                "the subject token expires too soon",
                reason=BrokerReason.EXPIRED,
            )
        return Issued(token_response(minted.token, minted.expires_in), minted)

    def _issue_wit(
        self, entry: Entry, proof: VerifiedProof, now: float, not_after: float | None = None
    ) -> Issued:
        """A WIT in the SPIFFE WIT-SVID profile for the key that signed the token request's
        DPoP proof (the sidecar's in-memory key): ``sub`` the entry's SPIFFE ID, no ``aud``."""
        key = self.ring.active
        if proof.key is None or proof.alg not in SVID_ALGORITHMS or key.alg not in SVID_ALGORITHMS:
            raise OAuthError(
                OAuthCode.INVALID_REQUEST,
                "a WIT-SVID needs an RS, ES or PS key for the proof and the issuer (no EdDSA)",
                reason=BrokerReason.WIT_KEY_ALG,
            )
        # Like an access token, a k8s-attested WIT never outlives its subject token.
        lifetime = self.cfg.wit_ttl if not_after is None else min(self.cfg.wit_ttl, not_after - now)
        if lifetime < 1:
            raise OAuthError(
                OAuthCode.INVALID_REQUEST,
                "the subject token expires too soon",
                reason=BrokerReason.EXPIRED,
            )
        wit = issue_wit(
            key.private_key,
            alg=key.alg,
            kid=key.kid,
            subject=entry.spiffe_id,
            workload_jwk=public_jwk_dict(proof.key.key, alg=proof.alg),
            now=now,
            lifetime=lifetime,
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
        elapsed = self.timer() - started
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
        steps = _Attestor("k8s", EXCHANGE_REFUSAL, {}, self._parse_exchange, self._k8s_caller)
        return await self._issue_attested(steps, http)

    @staticmethod
    def _parse_exchange(http: TokenHttpRequest) -> _Wanted:
        request = parse_exchange(parse_request(http))
        return _Wanted(request.audiences, wit=request.wit, subject_token=request.subject_token)

    async def _k8s_caller(self, wanted: _Wanted, now: float) -> _Caller:
        assert wanted.subject_token is not None
        identity = await self._k8s_identity(wanted.subject_token, now)
        return _Caller(
            identity.selectors,
            {
                "cluster": identity.cluster,
                "namespace": identity.namespace,
                "service_account": identity.service_account,
                "pod": identity.pod,
            },
            f"no registration entry for service account {identity.namespace}/"
            f"{identity.service_account} of {identity.cluster}",
            identity.expires_at,
        )

    async def _k8s_identity(self, token: str, now: float) -> K8sIdentity:
        if len(token) > self.cfg.max_subject_token_bytes:
            raise OAuthError(
                OAuthCode.INVALID_REQUEST,
                "subject_token is too large",
                reason=BrokerReason.MALFORMED_TOKEN,
            )
        try:
            return await self.clusters.verify(token, now)
        except SubjectTokenError as exc:
            if exc.retryable:
                raise OAuthError(
                    OAuthCode.TEMPORARILY_UNAVAILABLE,
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
                OAuthCode.INVALID_REQUEST,
                f"subject_token rejected ({exc.reason}): {exc.detail}",
                reason=exc.reason,
            ) from None

    # -- Unix attestation (Unix socket) -----------------------------------------------------

    async def attest_unix(
        self, peer: PeerCreds | AttestationFailure, http: TokenHttpRequest
    ) -> Issued:
        known = (
            {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid}
            if isinstance(peer, PeerCreds)
            else {}
        )

        async def identify(_: _Wanted, now: float) -> _Caller:
            evidence = await self._unix_evidence(peer)
            return _Caller(
                evidence.selectors,
                {"exe": evidence.exe, "sha256": evidence.sha256},
                f"no registration entry matches this workload (uid={evidence.uid} "
                f"gid={evidence.gid} exe={evidence.exe or 'unreadable'})",
            )

        steps = _Attestor("unix", UNIX_REFUSAL, known, self._parse_unix, identify)
        return await self._issue_attested(steps, http)

    @staticmethod
    def _parse_unix(http: TokenHttpRequest) -> _Wanted:
        form = parse_request(http)
        if requests_wit(form):
            return _Wanted([], wit=True)
        return _Wanted(targets(form))

    async def _issue_attested(self, attestor: _Attestor, http: TokenHttpRequest) -> Issued:
        """One token request, whatever the attestor: parse it, check the proof, attest the
        caller; then the registration entry, the audiences, revocation, issuance — and one
        audit record and metric either way. A refusal between the start of attestation and
        a matching entry counts as an attestation failure."""
        started = self.timer()
        now = self.clock()
        fields = dict(attestor.fields)
        attesting = False
        try:
            wanted = attestor.parse(http)
            fields["aud"] = wanted.audiences
            proof = self.verify_dpop(http.dpop, http.htu, now)
            fields["jkt"] = proof.jkt
            attesting = True
            caller = await attestor.identify(wanted, now)
            fields.update(caller.fields)
            entry = self.registry.match(caller.selectors)
            if entry is None:
                raise policy_refusal(attestor.refusal, caller.unregistered, BrokerReason.NO_ENTRY)
            attesting = False
            fields.update(sub=entry.spiffe_id, entry=entry.index)
            if not wanted.wit:
                self._allowed(entry, wanted.audiences)
            self._not_revoked(entry.spiffe_id, attestor.refusal)
            if wanted.wit:
                issued = self._issue_wit(entry, proof, now, caller.not_after)
            else:
                issued = self._issue(entry, wanted.audiences, proof, now, caller.not_after)
        except OAuthError as exc:
            self._finish(
                attestor.name, started, now, error=exc, attestation_failed=attesting, fields=fields
            )
            raise
        self._finish(attestor.name, started, now, issued=issued, fields=fields)
        self.metrics.granted(wanted.audiences, self.cfg.high_privilege_audiences)
        return issued

    async def _unix_evidence(self, peer: PeerCreds | AttestationFailure) -> UnixEvidence:
        try:
            if isinstance(peer, AttestationFailure):
                raise peer
            return await self.unix.attest(peer)
        except AttestationFailure as exc:
            raise OAuthError(
                OAuthCode.ACCESS_DENIED,
                f"attestation failed: {exc.detail}",
                status=403,
                reason=exc.reason,
            ) from None

    # -- registration entries (admin socket) --------------------------------------------------

    async def change_entries(self, doc: Any, *, actor_uid: int) -> dict[str, Any]:
        """``{"action": "add", "entry": {...}}`` or ``{"action": "remove", "spiffe_id": S}``:
        entries added at run time, kept in ``state_dir``; the file's own entries change by
        editing it and reloading."""
        action = doc.get("action") if isinstance(doc, dict) else None
        try:
            if action == "add" and isinstance(doc, dict) and isinstance(doc.get("entry"), dict):
                entry = await self.entries.add(doc["entry"])
                detail: dict[str, Any] = {"spiffe_id": entry.spiffe_id, "entry": entry.index}
            elif action == "remove" and isinstance(doc, dict):
                spiffe_id = doc.get("spiffe_id")
                if not isinstance(spiffe_id, str) or validate_value(spiffe_id) is not None:
                    raise OAuthError(OAuthCode.INVALID_REQUEST, "spiffe_id must be a SPIFFE ID")
                removed = await self.entries.remove(spiffe_id)
                if not removed:
                    raise OAuthError(
                        OAuthCode.INVALID_REQUEST,
                        f"no entry added at run time has spiffe_id {spiffe_id} (entries of the "
                        "configuration file change by editing it and reloading)",
                    )
                detail = {"spiffe_id": spiffe_id, "removed": removed}
            else:
                raise OAuthError(
                    OAuthCode.INVALID_REQUEST,
                    'send {"action": "add", "entry": {...}} or '
                    '{"action": "remove", "spiffe_id": "..."}',
                )
        except ConfigError as exc:
            raise OAuthError(OAuthCode.INVALID_REQUEST, str(exc)) from None
        self.unix.needs_sha256 = self.registry.needs_sha256
        self.audit.emit(
            "entries", self.clock(), result="ok", action=action, actor_uid=actor_uid, **detail
        )
        return {"action": action, **detail, "entries": len(self.registry.entries)}

    # -- revocation (admin socket) ----------------------------------------------------------

    async def change_revocation(
        self, kind: str, value: object, *, restore: bool, actor_uid: int
    ) -> dict[str, Any]:
        problem = validate_value(value)
        if problem is not None or kind not in ("sub", "jti"):
            raise OAuthError(OAuthCode.INVALID_REQUEST, f"{kind} must be {problem or 'sub or jti'}")
        assert isinstance(value, str)
        now = self.clock()
        store = self.revocations
        if kind == "sub":
            changed = store.restore_subject(value) if restore else store.revoke_subject(value)
        else:
            changed = store.restore_jti(value) if restore else store.revoke_jti(value, now)
        action = "restore" if restore else "revoke"
        if changed:
            await self.revocations.save()
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
