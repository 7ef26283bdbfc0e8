"""Revoked subjects and token ids, published at ``GET /revocations`` for the verifiers.

Wire format (what ``sidecar.authz`` polls)::

    200  ETag: "<32 hex>"   Cache-Control: no-cache
    {"subjects": ["spiffe://..."], "jtis": ["..."]}          (both sorted)

and ``304 Not Modified`` when ``If-None-Match`` names the current ETag (RFC 9110 §13.1.2: weak
comparison, ``*`` matches). The ETag is strong: a hash of the exact body bytes.
``Sidecar-List-Changed`` is when the list last changed (Unix seconds), so a verifier can measure
how long a change took to reach it.

Long-poll: a request with ``If-None-Match`` and ``Prefer: wait=N`` (RFC 7240 §4.3, delta-seconds)
is held while the list still has that ETag, at most ``min(N, revocation.max_wait)`` seconds,
then answered 200 (changed) or 304. ``Preference-Applied: wait=N`` says the wait is honoured —
also on an immediate 200 — so a verifier knows it may ask again at once; without it (an issuer
that does not long-poll, or ``revocation.max_waiting`` requests already held) it polls at its
interval.

A subject stays revoked until it is explicitly restored. A ``jti`` is dropped from the list
once no token carrying it can still be valid: it was issued before the revocation, and no
token lives longer than the longest TTL (plus a grace for the verifiers' leeway).

With a state file, every change is written to a temporary file, fsynced and renamed over the
old one, so a crash leaves either the old or the new list, never a torn one. A state file
that exists but cannot be read stops the broker from starting: forgetting revocations
silently would re-admit exactly the workloads someone chose to shut out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.broker.state_file import write_atomic
from sidecar.errors import ConfigError

MAX_VALUE = 2048
STATE_VERSION = 1


def validate_value(value: object) -> str | None:
    """None if ``value`` can be revoked (a printable string of sane length), else why not."""
    if not isinstance(value, str) or not value:
        return "a non-empty string"
    if len(value) > MAX_VALUE:
        return f"at most {MAX_VALUE} characters"
    if not value.isprintable():
        return "printable characters only"
    return None


@dataclass(frozen=True, slots=True)
class Published:
    body: bytes
    etag: str


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 §13.1.2: ``If-None-Match`` uses the weak comparison; ``*`` matches any."""
    if not if_none_match:
        return False
    value = if_none_match.strip()
    if value == "*":
        return True
    mine = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == mine for tag in value.split(","))


class RevocationStore:
    def __init__(
        self,
        state_file: str | None,
        *,
        jti_retention: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_file = state_file
        self.jti_retention = jti_retention
        self.clock = clock
        self.subjects: set[str] = set()
        self.jtis: dict[str, float] = {}  # jti -> when it was revoked
        self.version = 0
        self.changed_at = clock()
        self.waiting = 0  # long-poll requests held right now
        self._published: Published | None = None
        # Set (and replaced) on every change: wakes every held long-poll at once.
        self._change = asyncio.Event()
        self._closed = False
        self._save_lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self.subjects) + len(self.jtis)

    # -- persistence ------------------------------------------------------------------------

    def load(self) -> None:
        """Read the state file if it exists (at start, before serving)."""
        if self.state_file is None or not os.path.exists(self.state_file):
            return
        key = "revocation.state_file"
        try:
            with open(self.state_file, "rb") as f:
                doc = json.loads(f.read())
        except (OSError, ValueError) as exc:
            raise ConfigError(key, f"a readable revocation state file ({exc})") from None
        subjects = doc.get("subjects") if isinstance(doc, dict) else None
        jtis = doc.get("jtis") if isinstance(doc, dict) else None
        if (
            not isinstance(subjects, list)
            or not isinstance(jtis, dict)
            or any(validate_value(s) for s in subjects)
            or any(validate_value(j) or not isinstance(t, int | float) for j, t in jtis.items())
        ):
            raise ConfigError(key, "a revocation state file written by this broker")
        self.subjects = set(subjects)
        self.jtis = {j: float(t) for j, t in jtis.items()}
        self._changed()

    def state_bytes(self) -> bytes:
        doc = {
            "version": STATE_VERSION,
            "subjects": sorted(self.subjects),
            "jtis": dict(sorted(self.jtis.items())),
        }
        return json.dumps(doc, indent=1).encode() + b"\n"

    async def save(self) -> None:
        """Write the current state, if there is a state file (one writer at a time; each
        writes the latest state)."""
        if self.state_file is None:
            return
        async with self._save_lock:
            await asyncio.to_thread(self.save_sync, self.state_bytes())

    def save_sync(self, data: bytes) -> None:
        """Atomic replace (call in a thread: it fsyncs)."""
        if self.state_file is not None:
            write_atomic(self.state_file, data)

    # -- changes ----------------------------------------------------------------------------

    def revoke_subject(self, subject: str) -> bool:
        if subject in self.subjects:
            return False
        self.subjects.add(subject)
        self._changed()
        return True

    def restore_subject(self, subject: str) -> bool:
        if subject not in self.subjects:
            return False
        self.subjects.discard(subject)
        self._changed()
        return True

    def revoke_jti(self, jti: str, now: float) -> bool:
        if jti in self.jtis:
            return False
        self.jtis[jti] = now
        self._changed()
        return True

    def restore_jti(self, jti: str) -> bool:
        if self.jtis.pop(jti, None) is None:
            return False
        self._changed()
        return True

    def prune(self, now: float) -> list[str]:
        """Forget jtis whose tokens have all expired; returns them."""
        gone = [j for j, t in self.jtis.items() if now >= t + self.jti_retention]
        for jti in gone:
            del self.jtis[jti]
        if gone:
            self._changed()
        return gone

    def is_subject_revoked(self, subject: str) -> bool:
        return subject in self.subjects

    # -- publication ------------------------------------------------------------------------

    def published(self) -> Published:
        if self._published is None:
            doc = {"subjects": sorted(self.subjects), "jtis": sorted(self.jtis)}
            body = json.dumps(doc, separators=(",", ":")).encode()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            self._published = Published(body=body, etag=etag)
        return self._published

    def _changed(self) -> None:
        self.version += 1
        self.changed_at = self.clock()
        self._published = None
        self._change.set()
        self._change = asyncio.Event()

    async def wait_for_change(self, if_none_match: str | None, seconds: float) -> None:
        """Return once the published list no longer matches ``if_none_match``, after
        ``seconds`` at most, or at once when the store is closing."""
        deadline = time.monotonic() + seconds
        self.waiting += 1
        try:
            while not self._closed and etag_matches(if_none_match, self.published().etag):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._change.wait(), remaining)
        finally:
            self.waiting -= 1

    def close(self) -> None:
        """Release every held request (shutdown): they answer with what they have."""
        self._closed = True
        self._change.set()
