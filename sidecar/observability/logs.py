"""Process logging: one line per event on stderr, never a token or a key.

Two formats (``--log-format``, or ``SIDECAR_LOG_FORMAT``): ``text`` — ``time level logger
message`` then the record's fields as logfmt ``key=value`` — and ``json``, one object per line
with ``ts``, ``level``, ``logger``, ``msg`` and the fields as keys. Fields are attached with
``extra={"fields": ((key, value), …)}``; keys are ours, values may come from a client and are
escaped by the format (logfmt quoting, or JSON with ``ensure_ascii``) and cut at
:data:`~sidecar.observability.logsafe.MAX_VALUE` characters, so a record is always one line
and cannot fake a field.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sidecar.errors import ConfigError
from sidecar.observability.logsafe import MAX_VALUE, logfmt

#: What ``--log-level`` and ``SIDECAR_LOG_LEVEL`` accept.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

LOG_FORMATS = ("text", "json")
_active = {"format": "text"}

# (second, its text): one tuple, replaced whole, so that threads logging at once never mix two.
_SECOND: list[tuple[int, str]] = [(-1, "")]


def rfc3339(ts: float) -> str:
    """``2026-01-02T03:04:05.678Z``; the part up to the second is formatted once a second."""
    second = int(ts)
    cached = _SECOND[0]
    if cached[0] != second:
        cached = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        _SECOND[0] = cached
    return f"{cached[1]}.{int((ts - second) * 1000):03d}Z"


def _fields(record: logging.LogRecord) -> Iterable[tuple[str, object]]:
    fields: Iterable[tuple[str, object]] = getattr(record, "fields", ())
    return fields


class TextFormatter(logging.Formatter):
    """``2026-01-02T03:04:05 INFO logger message key=value …``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = logfmt(_fields(record))
        return f"{line} {fields}" if fields else line


def _json_value(value: object) -> object:
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= MAX_VALUE else text[:MAX_VALUE] + "..."


def _json_line(out: dict[str, object], fields: Iterable[tuple[str, object]]) -> str:
    for key, value in fields:
        out.setdefault(key, _json_value(value))  # never overwrite ts, level, logger, msg
    return json.dumps(out, ensure_ascii=True, separators=(",", ":"))


class JsonFormatter(logging.Formatter):
    """``{"ts": …, "level": …, "logger": …, "msg": …, <fields>}`` on one line (ASCII)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _json_line(out, _fields(record))


def setup_logging(level: str | None = None, fmt: str | None = None) -> None:
    level = (level or os.environ.get("SIDECAR_LOG_LEVEL") or "INFO").upper()
    if level not in LOG_LEVELS:
        raise ConfigError("SIDECAR_LOG_LEVEL", f"one of {list(LOG_LEVELS)}", level)
    fmt = (fmt or os.environ.get("SIDECAR_LOG_FORMAT") or "text").lower()
    if fmt not in LOG_FORMATS:
        raise ConfigError("SIDECAR_LOG_FORMAT", f"one of {list(LOG_FORMATS)}", fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    _active["format"] = fmt
    # aiohttp's access log would print every request: our decisions are logged already.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def plain_event(msg: str, fields: Mapping[str, object]) -> str:
    """A line written outside logging (the ready line) in the active format: text
    ``msg key=value …`` (values are ours: addresses, ports) or one JSON object."""
    if _active["format"] == "json":
        out: dict[str, object] = {"ts": rfc3339(time.time()), "level": "INFO", "msg": msg}
        return _json_line(out, fields.items())
    return " ".join([msg, *(f"{k}={v}" for k, v in fields.items())])


def active_format() -> str:
    """The format :func:`setup_logging` chose (worker processes are started with it)."""
    return _active["format"]


class RateLimitedLog:
    """At most one line per ``key`` per ``interval`` seconds; the lines held back are counted
    and the next line that gets through says so: ``… (repeated 57 times in the last 30 s)``.

    For conditions that repeat with every request or retry (an issuer outage, an upstream
    that keeps refusing): the first occurrence is logged at once, then the log stays readable
    and bounded however high the rate. The clock is passed in; keys are bounded (the oldest
    is forgotten first)."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 30.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._max_keys = max_keys
        # key -> [time of the last line written, occurrences held back since, last message]
        self._keys: dict[Hashable, list[Any]] = {}

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless a line for ``key`` went out less than ``interval`` ago;
        True if it was written."""
        now = self._clock()
        entry = self._keys.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            entry[2] = (level, msg, args)
            return False
        if entry is None:
            if len(self._keys) >= self._max_keys:
                del self._keys[next(iter(self._keys))]
            self._keys[key] = [now, 0, None]
            self.logger.log(level, msg, *args)
        else:
            self._write(level, msg, args, entry[1], now - entry[0])
            entry[:] = [now, 0, None]
        return True

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def resolved(self, key: Hashable) -> None:
        """The condition behind ``key`` is over: write the last held-back line (with its
        count) if any, and forget the key so that a new occurrence is logged at once."""
        entry = self._keys.pop(key, None)
        if entry is not None and entry[1]:
            level, msg, args = entry[2]
            self._write(level, msg, args, entry[1], self._clock() - entry[0])

    def _write(
        self, level: int, msg: str, args: tuple[object, ...], count: int, span: float
    ) -> None:
        if count:
            msg = f"{msg} (repeated %d times in the last %.0f s)"
            args = (*args, count, span)
        self.logger.log(level, msg, *args)
