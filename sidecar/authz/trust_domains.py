"""SPIFFE trust domains on ingress: ``authz.trust_domains[]``, their bundles, and the store the
JWT-SVID (and, later, WIT-SVID) verifiers read.

A bundle comes from a file, a SPIFFE bundle endpoint (Trust Domain and Bundle §5.2, the
``https_web`` profile: plain HTTPS with Web PKI server authentication), or the Workload API
(``FetchJWTBundles``). Each is kept fresh by the same JwksSource as an issuer's JWKS. Keys are
held per ``use`` so a key published for one token type never verifies another.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.config_util import (
    exactly_one,
    get_algorithms,
    get_bool,
    get_duration,
    get_opt_str,
    known_keys,
    parse_fetch_tls,
    section,
)
from sidecar.errors import ConfigError
from sidecar.identity.workload_api import WorkloadApi
from sidecar.jose.jwks import KeyStore
from sidecar.jose.rfc7515_jws import JWSFormatError, parse_compact
from sidecar.jose.rfc7517_jwk import PublicJWK
from sidecar.jose.spiffe_bundle import JWT_USES, WIT_SVID, import_bundle, refresh_hint
from sidecar.jose.spiffe_id import SCHEME, trust_domain_of, valid_trust_domain
from sidecar.jose.spiffe_jwt_svid import JWT_SVID_ALGORITHMS
from sidecar.jwks_source import JwksLocation, JwksSource

log = logging.getLogger(__name__)


class TrustBundles:
    """The trusted domains' keys, one KeyStore per ``use``. ``generation`` changes whenever
    any of them changes (verified-token caches key on it)."""

    def __init__(self) -> None:
        self._by_use = {use: KeyStore() for use in sorted(JWT_USES)}
        self._domains: list[str] = []
        self.generation = 0

    def replace(self, issuer: str, keys: Sequence[PublicJWK]) -> bool:
        """Install a trust domain's whole bundle (``issuer`` is the trust domain name)."""
        if issuer not in self._domains:
            self._domains.append(issuer)
        changed = False
        for use, store in self._by_use.items():
            changed |= store.replace(issuer, [k for k in keys if k.use == use])
        if changed:
            self.generation += 1
        return changed

    def has_issuer(self, issuer: str) -> bool:
        return issuer in self._domains

    def forget(self, issuer: str) -> None:
        """Drop a trust domain's bundle (no longer trusted, or its source changed)."""
        if issuer in self._domains:
            self._domains.remove(issuer)
            for store in self._by_use.values():
                store.forget(issuer)
            self.generation += 1

    def keys_for_use(self, use: str, trust_domain: str, kid: str | None) -> Sequence[PublicJWK]:
        store = self._by_use.get(use)
        return () if store is None else store.keys_for(trust_domain, kid)

    def wit_keys(self, trust_domain: str, kid: str | None) -> Sequence[PublicJWK]:
        """The ``wit-svid`` keys (``sidecar.jose.wimse_wit.WitKeys``)."""
        return self.keys_for_use(WIT_SVID, trust_domain, kid)

    def trust_domains(self) -> Sequence[str]:
        return self._domains

    def key_count(self) -> int:
        return sum(store.key_count() for store in self._by_use.values())


@dataclass(frozen=True, slots=True)
class TrustDomainSource:
    name: str
    algorithms: frozenset[str]
    location: JwksLocation
    #: The Workload API socket (``unix:///path``; None: ``SPIFFE_ENDPOINT_SOCKET``) when the
    #: bundle comes from there.
    workload_api: bool
    socket: str | None
    refresh_interval: float
    min_refresh_interval: float


TRUST_DOMAIN_KEYS = {
    "name",
    "bundle_file",
    "bundle_endpoint",
    "workload_api",
    "socket",
    "algorithms",
    "refresh_interval",
    "min_refresh_interval",
    "insecure_http",
    "tls",
}


def _trust_domain(raw: Any, key: str) -> TrustDomainSource:
    item = section(raw, key)
    known_keys(item, key, TRUST_DOMAIN_KEYS)
    name = get_opt_str(item, "name", key)
    if name is None or not valid_trust_domain(name):
        raise ConfigError(
            f"{key}.name", "a trust domain name: lower-case letters, digits, '.', '-', '_'", name
        )
    bundle_file = get_opt_str(item, "bundle_file", key)
    endpoint = get_opt_str(item, "bundle_endpoint", key)
    workload_api = get_bool(item, "workload_api", key, False)
    chosen = {"bundle_file": bundle_file, "bundle_endpoint": endpoint}
    exactly_one(key, {**chosen, "workload_api: true": workload_api})
    if endpoint is not None:
        insecure = get_bool(item, "insecure_http", key, False)
        if not endpoint.startswith("https://") and not (
            insecure and endpoint.startswith("http://")
        ):
            raise ConfigError(
                f"{key}.bundle_endpoint",
                "an https URL (https_web profile; http only with insecure_http: true, for tests)",
                endpoint,
            )
        if insecure:
            log.warning("%s.insecure_http is set: the bundle is fetched without TLS", key)
    socket = get_opt_str(item, "socket", key)
    if socket is not None and (not workload_api or not socket.startswith("unix://")):
        raise ConfigError(f"{key}.socket", "a unix:///path, with workload_api: true", socket)
    return TrustDomainSource(
        name=name,
        algorithms=get_algorithms(item, "algorithms", key, sorted(JWT_SVID_ALGORITHMS)),
        location=JwksLocation(
            issuer=name,
            file=bundle_file,
            uri=endpoint,
            tls=parse_fetch_tls(item, key, endpoint is not None),
        ),
        workload_api=workload_api,
        socket=socket,
        refresh_interval=get_duration(item, "refresh_interval", key, 300.0, minimum=1.0),
        min_refresh_interval=get_duration(item, "min_refresh_interval", key, 10.0),
    )


def parse_trust_domains(root: Mapping[str, Any], path: str) -> tuple[TrustDomainSource, ...]:
    raw = root.get("trust_domains", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{path}.trust_domains", "a list of trust domains", raw)
    out: list[TrustDomainSource] = []
    for i, item in enumerate(raw):
        source = _trust_domain(item, f"{path}.trust_domains[{i}]")
        if any(s.name == source.name for s in out):
            raise ConfigError(f"{path}.trust_domains[{i}].name", "a unique name", source.name)
        out.append(source)
    return tuple(out)


def make_bundle_source(
    src: TrustDomainSource, bundles: TrustBundles
) -> tuple[JwksSource, WorkloadApi | None]:
    """A JwksSource that keeps ``src``'s bundle in ``bundles`` (and its Workload API client,
    to close at the end)."""
    fetch = None
    api = WorkloadApi(src.socket) if src.workload_api else None
    if api is not None:

        async def fetch() -> Any:
            return await api.jwt_bundle(src.name)

    source = JwksSource(
        src.location,
        bundles,
        refresh_interval=src.refresh_interval,
        min_refresh_interval=src.min_refresh_interval,
        importer=import_bundle,
        fetch_document=fetch,
        refresh_hint=refresh_hint,
    )
    return source, api


def refresh_target(token: str, issuers: Mapping[str, Any]) -> str | None:
    """Whose keys to refresh for a token with an unknown key, read without verification: its
    ``iss`` when that is a configured issuer, else ``spiffe://<trust domain of sub>``."""
    try:
        claims = parse_compact(token, max_bytes=len(token)).payload
    except JWSFormatError:
        return None
    iss, sub = claims.get("iss"), claims.get("sub")
    if isinstance(iss, str) and iss in issuers:
        return iss
    if isinstance(sub, str):
        domain = trust_domain_of(sub)
        if domain is not None:
            return SCHEME + domain
    return iss if isinstance(iss, str) else None
