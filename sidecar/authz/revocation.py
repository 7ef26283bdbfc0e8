"""Revoked subjects and token ids, as published by the issuer and polled by verifiers."""

from __future__ import annotations


class RevocationList:
    """Held in memory and replaced whole on each poll, so a check is two set look-ups."""

    def __init__(self) -> None:
        self.subjects: frozenset[str] = frozenset()
        self.jtis: frozenset[str] = frozenset()
        self.version: str | None = None

    def replace(
        self, *, subjects: frozenset[str], jtis: frozenset[str], version: str | None
    ) -> None:
        self.subjects, self.jtis, self.version = subjects, jtis, version

    def is_revoked(self, subject: str, jti: str | None) -> bool:
        return subject in self.subjects or (jti is not None and jti in self.jtis)

    def __len__(self) -> int:
        return len(self.subjects) + len(self.jtis)
