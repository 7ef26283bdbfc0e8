"""Kubernetes workload attestation: verify a projected service-account token against its
cluster issuer and turn it into selectors.

The token is a JWT signed by the cluster's service-account issuer (``--service-account-issuer``;
keys from its OIDC discovery document or a JWKS file). It is verified with the same code as our
own access tokens (:func:`verify_access_token`) under an :class:`IssuerPolicy` that does not
require a ``typ`` (Kubernetes sets none), with the cluster's accepted audiences, ``exp``
required, and ``nbf``/``iat`` checked with leeway. Legacy secret-based tokens (no ``exp``) are
refused.

Identity: ``sub`` = ``system:serviceaccount:NS:SA`` and/or the ``kubernetes.io`` claim
(``{"namespace": NS, "serviceaccount": {"name": SA, ...}, ...}``); when both are present they
must agree. Selectors: ``k8s:ns:NS``, ``k8s:sa:SA``, ``k8s:cluster:ISSUER``.

Verified tokens are cached (bounded, keyed by the token, valid until their ``exp`` and while the
cluster's key set is unchanged): a sidecar presents the same token until the kubelet rotates it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.broker.codes import BrokerReason, BrokerRefusal, from_jose
from sidecar.broker.config import ClusterConfig
from sidecar.broker.registry import is_dns_label, is_dns_subdomain, k8s_selectors
from sidecar.errors import AuthError, Reason
from sidecar.jose.jwks import KeyStore
from sidecar.jose.rfc7515_jws import JWSFormatError, parse_compact
from sidecar.jose.rfc9068_access_token import IssuerPolicy, VerifiedToken, verify_access_token
from sidecar.jwks_source import JwksSource

UNKNOWN_KID_WAIT = 1.0
SA_PREFIX = "system:serviceaccount:"


NOT_SA = BrokerReason.NOT_SERVICE_ACCOUNT


class SubjectTokenError(BrokerRefusal):
    """The subject token is not acceptable."""

    def __init__(self, reason: BrokerReason, detail: str, *, retryable: bool = False) -> None:
        super().__init__(reason, detail)
        #: True when it is our side that cannot decide (the cluster's keys are unavailable).
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class K8sIdentity:
    cluster: str
    namespace: str
    service_account: str
    expires_at: float
    selectors: frozenset[str]
    pod: str | None = None


def service_account_of(claims: Mapping[str, Any], subject: str) -> tuple[str, str]:
    """(namespace, service account) from ``sub`` and/or the ``kubernetes.io`` claim."""
    from_sub: tuple[str, str] | None = None
    if subject.startswith(SA_PREFIX):
        parts = subject[len(SA_PREFIX) :].split(":")
        if len(parts) != 2:
            raise SubjectTokenError(NOT_SA, "sub is not system:serviceaccount:NS:SA")
        from_sub = (parts[0], parts[1])
    from_claim: tuple[str, str] | None = None
    k8s = claims.get("kubernetes.io")
    if k8s is not None:
        if not isinstance(k8s, dict):
            raise SubjectTokenError(NOT_SA, "kubernetes.io claim is not an object")
        ns = k8s.get("namespace")
        sa = k8s.get("serviceaccount")
        name = sa.get("name") if isinstance(sa, dict) else None
        if not isinstance(ns, str) or not isinstance(name, str):
            raise SubjectTokenError(
                NOT_SA, "kubernetes.io claim lacks namespace/serviceaccount.name"
            )
        from_claim = (ns, name)
    if from_sub is not None and from_claim is not None and from_sub != from_claim:
        raise SubjectTokenError(NOT_SA, "sub and the kubernetes.io claim name different accounts")
    found = from_sub or from_claim
    if found is None:
        raise SubjectTokenError(NOT_SA, "not a Kubernetes service-account token")
    ns, sa = found
    if not is_dns_label(ns) or not is_dns_subdomain(sa):
        raise SubjectTokenError(NOT_SA, "namespace or service account is invalid")
    return ns, sa


def _pod_name(claims: Mapping[str, Any]) -> str | None:
    k8s = claims.get("kubernetes.io")
    pod = k8s.get("pod") if isinstance(k8s, dict) else None
    name = pod.get("name") if isinstance(pod, dict) else None
    return name if isinstance(name, str) and is_dns_subdomain(name) else None


class ClusterVerifier:
    def __init__(
        self,
        clusters: tuple[ClusterConfig, ...],
        *,
        leeway: float,
        max_bytes: int,
        cache_size: int = 10_000,
    ) -> None:
        self.clusters = {c.issuer: c for c in clusters}
        self.keys = KeyStore()
        self.policies = {
            c.issuer: IssuerPolicy(
                issuer=c.issuer, algorithms=c.algorithms, token_types=frozenset()
            )
            for c in clusters
        }
        self.sources = {
            c.issuer: JwksSource(
                c.location,
                self.keys,
                refresh_interval=c.refresh_interval,
                min_refresh_interval=c.min_refresh_interval,
            )
            for c in clusters
        }
        self.leeway = leeway
        self.max_bytes = max_bytes
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, tuple[K8sIdentity, int]] = OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, first_load_timeout: float = 5.0) -> None:
        if not self.sources:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(s.refresh("startup") for s in self.sources.values())),
                first_load_timeout,
            )
        self._tasks = [asyncio.create_task(s.run_periodic()) for s in self.sources.values()]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def missing_keys(self) -> list[str]:
        return [iss for iss in self.sources if not self.keys.has_issuer(iss)]

    async def verify(self, token: str, now: float) -> K8sIdentity:
        # Keyed by a digest: the cache must not hold thousands of 16 KiB bearer credentials.
        digest = hashlib.sha256(token.encode("ascii", "replace")).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            identity, generation = cached
            if generation == self.keys.generation and now < identity.expires_at + self.leeway:
                self._cache.move_to_end(digest)
                return identity
            del self._cache[digest]
        identity = await self._verify(token, now)
        self._cache[digest] = (identity, self.keys.generation)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return identity

    async def _verify(self, token: str, now: float) -> K8sIdentity:
        # Pick the cluster by the (not yet verified) issuer, so each cluster's own audiences
        # apply; the signature check below is what makes the issuer trustworthy.
        try:
            iss = parse_compact(token, max_bytes=self.max_bytes).payload.get("iss")
        except JWSFormatError as exc:
            raise SubjectTokenError(BrokerReason.MALFORMED_TOKEN, str(exc)) from None
        cluster = self.clusters.get(iss) if isinstance(iss, str) else None
        if cluster is None:
            raise SubjectTokenError(BrokerReason.UNTRUSTED_ISSUER, "issuer is not a known cluster")
        if not self.keys.has_issuer(cluster.issuer):
            await self._refresh(cluster.issuer)
            if not self.keys.has_issuer(cluster.issuer):
                raise SubjectTokenError(
                    BrokerReason.CLUSTER_KEYS_UNAVAILABLE,
                    "the cluster's signing keys could not be loaded",
                    retryable=True,
                )
        try:
            verified = self._check(token, cluster, now)
        except AuthError as exc:
            if exc.reason is not Reason.UNKNOWN_KEY or not await self._refresh(cluster.issuer):
                raise SubjectTokenError(
                    from_jose(exc.reason, BrokerReason.MALFORMED_TOKEN), exc.detail
                ) from None
            try:
                verified = self._check(token, cluster, now)
            except AuthError as again:
                raise SubjectTokenError(
                    from_jose(again.reason, BrokerReason.MALFORMED_TOKEN), again.detail
                ) from None
        claims = parse_compact(token, max_bytes=self.max_bytes).payload
        ns, sa = service_account_of(claims, verified.subject)
        return K8sIdentity(
            cluster=cluster.issuer,
            namespace=ns,
            service_account=sa,
            expires_at=verified.expires_at,
            selectors=k8s_selectors(namespace=ns, service_account=sa, cluster=cluster.issuer),
            pod=_pod_name(claims),
        )

    def _check(self, token: str, cluster: ClusterConfig, now: float) -> VerifiedToken:
        return verify_access_token(
            token,
            issuers={cluster.issuer: self.policies[cluster.issuer]},
            keys=self.keys,
            audiences=cluster.audiences,
            now=now,
            leeway=self.leeway,
            max_bytes=self.max_bytes,
        )

    async def _refresh(self, issuer: str) -> bool:
        """Refetch a cluster's keys (rate-limited), waiting a bounded time."""
        source = self.sources[issuer]
        if not source.may_refresh():
            return False
        try:
            return await asyncio.wait_for(
                asyncio.shield(source.refresh("unknown_kid")), UNKNOWN_KID_WAIT
            )
        except TimeoutError:
            return False
