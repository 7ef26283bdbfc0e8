"""The in-memory key store the verifiers read: keys by issuer (and ``kid``), swapped whole.

Pure: loading the keys (files, URLs, OIDC discovery, the SPIFFE Workload API) is
:mod:`sidecar.jwks_source`'s job; it puts what it parsed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sidecar.jose.rfc7517_jwk import PublicJWK


class KeySink(Protocol):
    """Where a source puts the keys it loaded: a KeyStore, or the SPIFFE trust bundles."""

    def replace(self, issuer: str, keys: Sequence[PublicJWK]) -> bool: ...

    def has_issuer(self, issuer: str) -> bool: ...

    def forget(self, issuer: str) -> None: ...


class KeyStore:
    """Keys by issuer; ``generation`` changes whenever any issuer's set changes, so caches
    of tokens verified under an older set can drop themselves."""

    def __init__(self) -> None:
        self._by_issuer: dict[str, tuple[dict[str, list[PublicJWK]], list[PublicJWK]]] = {}
        self.generation = 0

    def replace(self, issuer: str, keys: Sequence[PublicJWK]) -> bool:
        by_kid: dict[str, list[PublicJWK]] = {}
        for key in keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, []).append(key)
        old = self._by_issuer.get(issuer)
        changed = old is None or {k.thumbprint for k in old[1]} != {k.thumbprint for k in keys}
        self._by_issuer[issuer] = (by_kid, list(keys))
        if changed:
            self.generation += 1
        return changed

    def keys_for(self, issuer: str, kid: str | None) -> Sequence[PublicJWK]:
        entry = self._by_issuer.get(issuer)
        if entry is None:
            return ()
        if kid is None:
            return entry[1]
        return entry[0].get(kid, ())

    def has_issuer(self, issuer: str) -> bool:
        return issuer in self._by_issuer

    def forget(self, issuer: str) -> None:
        """Drop an issuer's keys (it is no longer trusted, or its key source changed)."""
        if self._by_issuer.pop(issuer, None) is not None:
            self.generation += 1

    def key_count(self) -> int:
        return sum(len(all_keys) for _, all_keys in self._by_issuer.values())

    def thumbprints(self, issuer: str) -> list[str]:
        entry = self._by_issuer.get(issuer)
        return [] if entry is None else [k.thumbprint for k in entry[1]]
