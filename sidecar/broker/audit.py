"""The broker's audit trail: one JSON object per line, for every issuance, refusal, attestation
failure, revocation and key event.

Fields (absent when not applicable): ``ts`` (RFC 3339, UTC, ms), ``event`` (``issuance``,
``refusal``, ``attestation_failure``, ``revocation``, ``key_published``, ``key_activated``,
``key_retired``, ``key_removed``), ``result`` (``ok`` / ``denied`` / ``error``), ``reason``,
``error`` (the OAuth error code sent), ``detail``, ``attestor`` (``unix`` / ``k8s``), ``sub``,
``jti``, ``aud``, ``exp``, ``kid``, ``jkt``, ``entry``; for unix callers ``pid``, ``uid``,
``gid``, ``exe``, ``sha256``; for Kubernetes callers ``cluster``, ``namespace``,
``service_account``. A token, a proof or a key is NEVER written: the record type has no field
that could hold one, and ``detail`` strings are built by this package. Client values that do
appear (``sub``, ``jti``, an audience in a detail) are JSON-escaped with ``ensure_ascii``: a
record is always exactly one line.

Where: ``audit.path`` (a file, opened for append), else standard output — its own stream, apart
from the text or JSON process log on standard error, so a log shipper can route it by stream.

Lines are written in batches: one ``write`` per event-loop iteration, so a burst of issuances
costs one system call, and ordering is preserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from typing import Any, TextIO

from sidecar.errors import ConfigError
from sidecar.observability.logs import rfc3339


class AuditLog:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self._owned: TextIO | None = None
        if path is not None:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            except OSError as exc:
                raise ConfigError(
                    "audit.path", f"a file this user can append to ({exc.strerror})", path
                ) from None
            self._owned = os.fdopen(fd, "a", encoding="utf-8")
        self._pending: list[str] = []
        self._scheduled = False

    @property
    def _stream(self) -> TextIO:
        return self._owned if self._owned is not None else sys.stdout

    def emit(self, event: str, now: float, **fields: Any) -> None:
        record: dict[str, Any] = {"ts": rfc3339(now), "event": event}
        for key, value in fields.items():
            if value is not None:
                record[key] = value
        self._pending.append(json.dumps(record, separators=(",", ":"), ensure_ascii=True))
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        stream = self._stream
        try:
            stream.write("\n".join(lines) + "\n")
            stream.flush()
        except OSError:  # pragma: no cover - a full disk must not take issuance down
            sys.stderr.write(f"audit: cannot write {len(lines)} record(s) to {self.path}\n")

    def close(self) -> None:
        self.flush()
        if self._owned is not None:
            with contextlib.suppress(OSError):
                self._owned.close()
            self._owned = None
