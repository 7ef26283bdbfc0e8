"""Reloading a command's configuration file: on SIGHUP (the :class:`~sidecar.runtime.Lifecycle`
reload hook) and, with ``--watch-config``, when the file changes.

The file is read and parsed again; ``apply`` validates it against what runs and swaps it in, or
raises :class:`ConfigError` to refuse it (the running configuration stays). Each attempt is
counted in ``sidecar_config_reloads_total{result}``; ``sidecar_config_info{sha256}`` names the
file that is in force.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from sidecar.config_util import load_yaml_file
from sidecar.errors import ConfigError, ConfigErrors
from sidecar.observability.logsafe import logfmt_value

if TYPE_CHECKING:
    from sidecar.runtime import Lifecycle

log = logging.getLogger(__name__)

#: Validates the re-read file (and the SHA-256 of what was read) and swaps it in, or raises.
Apply = Callable[[dict[str, Any], str], Awaitable[None]]

#: ``--watch-config`` without a value: seconds between two looks at the file.
DEFAULT_WATCH_INTERVAL = 2.0


def needs_restart(key: str) -> ConfigError:
    """The refusal of a change that cannot be applied in place. Values are not shown: a
    section or a URL may hold a secret."""
    return ConfigError(key, f"the running value, or a restart (needs restart: {key})")


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class ReloadMetrics:
    """``sidecar_config_reloads_total{result}`` and ``sidecar_config_info{sha256}``."""

    def __init__(self, registry: CollectorRegistry, sha256: str) -> None:
        self.reloads = Counter(
            "sidecar_config_reloads",
            "Configuration reloads (SIGHUP or file watch), by result: ok or error (refused)",
            ["result"],
            registry=registry,
        )
        for result in ("ok", "error"):
            self.reloads.labels(result)
        self.info = Gauge(
            "sidecar_config_info",
            "1 for the SHA-256 of the configuration file in force",
            ["sha256"],
            registry=registry,
        )
        self.sha256 = sha256
        self.info.labels(sha256).set(1)

    async def attempt(self, sha256: str, apply: Callable[[], Awaitable[None]]) -> bool:
        """Run ``apply``; count it; a ConfigError is a refusal (logged, the old state kept)."""
        try:
            await apply()
        except ConfigError as exc:
            self.reloads.labels("error").inc()
            # One line per mistake: a log line is bounded, a file may have many.
            for error in exc.errors if isinstance(exc, ConfigErrors) else [exc]:
                log.error(
                    "config reload refused, the running configuration is kept: sha256=%s error=%s",
                    sha256[:16],
                    logfmt_value(str(error)),
                )
            return False
        self.reloads.labels("ok").inc()
        if sha256 != self.sha256:
            self.info.remove(self.sha256)
            self.sha256 = sha256
            self.info.labels(sha256).set(1)
        log.info("config reloaded sha256=%s", sha256[:16])
        return True


class ConfigReloader:
    """Re-reads the file a command was started with and hands it to ``apply``."""

    def __init__(self, path: str, registry: CollectorRegistry, apply: Apply) -> None:
        self.path = path
        self.apply = apply
        self.metrics = ReloadMetrics(registry, self._digest_or_empty())
        self._refused: str | None = None  # a refused file is not retried until it changes

    def _digest_or_empty(self) -> str:
        try:
            return file_sha256(self.path)
        except OSError:
            return ""

    async def reload(self) -> bool:
        """Re-read the file and apply it; False (logged, counted) when it was refused."""
        digest = self._digest_or_empty()

        async def apply() -> None:
            if not digest:
                raise ConfigError("config file", "a readable file", self.path)
            # Not under collecting(): apply() acts on what it parsed, so a parser must raise
            # before returning (parse_broker_config and config_files.parse_* do).
            await self.apply(load_yaml_file(self.path), digest)

        ok = await self.metrics.attempt(digest, apply)
        self._refused = None if ok else digest
        return ok

    async def watch(self, request_reload: Callable[[], None], interval: float) -> None:
        """Poll the file's metadata every ``interval`` s; when it changed, hash it, and when
        the content differs from what runs (and from the last refused file), ask for a reload.
        A stat per interval: nothing is read while the file stays as it is."""
        seen = self._stat()
        while True:
            await asyncio.sleep(interval)
            now = self._stat()
            if now == seen:
                continue
            seen = now
            digest = self._digest_or_empty()
            if digest and digest not in (self.metrics.sha256, self._refused):
                request_reload()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino


def _interval(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0.05 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"seconds between 0.05 and 3600, got {text!r}")
    return seconds


def watch_option(parser: Any) -> None:
    """``--watch-config [SECONDS]`` on each long-running command."""
    parser.add_argument(
        "--watch-config",
        type=_interval,
        nargs="?",
        const=DEFAULT_WATCH_INTERVAL,
        default=None,
        metavar="SECONDS",
        help="also reload when the config file changes (checked every SECONDS, default "
        f"{DEFAULT_WATCH_INTERVAL:g}); SIGHUP always reloads",
    )


def attach(lifecycle: Lifecycle, reloader: ConfigReloader, watch: float | None) -> None:
    """SIGHUP runs ``reloader``; with ``watch`` (seconds), so does a change of the file."""
    lifecycle.on_reload(reloader.reload)
    if watch is not None:
        lifecycle.background(lambda: reloader.watch(lifecycle.request_reload, watch))
