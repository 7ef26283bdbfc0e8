"""Process logging: one line per event on stderr, key=value, never a token or a key."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Hashable
from typing import Any

from sidecar.errors import ConfigError

#: What ``--log-level`` and ``SIDECAR_LOG_LEVEL`` accept.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("SIDECAR_LOG_LEVEL") or "INFO").upper()
    if level not in LOG_LEVELS:
        raise ConfigError("SIDECAR_LOG_LEVEL", f"one of {list(LOG_LEVELS)}", level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log would print every request: our decisions are logged already.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


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
