"""TLS files rotated in place (cert-manager, a Kubernetes secret volume) are used for new
connections without a restart, and what is in use is visible on ``/metrics``.

A :class:`ContextSource` holds the context built from a block's files. When it is used, at
most every :data:`FILE_CHECK_INTERVAL` seconds, it compares the files' inode, size, mtime and ctime
with what it loaded (``stat`` only: no read while nothing changed) and, if one changed, builds
the context again. A set of files that does not load (a key written before its certificate,
a file missing for a moment) is logged once per change and the previous context stays in use
until a later look finds the files whole.

Equal blocks (same place in the configuration, same files) share one source
(:func:`shared_source`), so a configuration reload that keeps a block keeps its state.
:class:`TLSFilesCollector` reports, for every block in use, when its certificates expire and
whether newer files on disk failed to load.
"""

from __future__ import annotations

import itertools
import logging
import os
import ssl
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from cryptography import x509
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar.errors import ConfigError
from sidecar.observability.logsafe import logfmt_value

log = logging.getLogger(__name__)

#: Seconds between two looks at a block's files.
FILE_CHECK_INTERVAL = 10.0
#: The files of a block that hold certificates (not keys), by their configuration key.
_CERTIFICATE_KEYS = ("ca_file", "cert_file", "client_ca_file")

_Stamp = tuple[tuple[int, int, int, int, int] | None, ...]


def _stamp(paths: tuple[str, ...]) -> _Stamp:
    """What identifies each file's content without reading it (None: not there right now)."""
    out: list[tuple[int, int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)  # follows the symlink a Kubernetes volume swaps on update
        except OSError:
            out.append(None)
        else:
            # ctime too: cp -p, tar and rsync restore an old mtime on new content.
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def _expiry(files: Mapping[str, str]) -> dict[str, float]:
    """{configuration key: the earliest notAfter (Unix time) of the certificates in it}: a
    chain or a bundle is only as good as its first certificate to expire."""
    out: dict[str, float] = {}
    for key in _CERTIFICATE_KEYS:
        path = files.get(key)
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                certificates = x509.load_pem_x509_certificates(f.read())
        except (OSError, ValueError):  # OpenSSL loaded it; not worth failing a build over
            continue
        out[key] = min(c.not_valid_after_utc.timestamp() for c in certificates)
    return out


_serials = itertools.count()


class ContextSource:
    """The context built from a block's files, built again when they change on disk.

    ``build`` raises :class:`ConfigError` for files that do not load: at start that is a
    configuration error; later it keeps the context in use (logged once per change)."""

    __slots__ = (
        "__weakref__",
        "_build",
        "_clock",
        "_failed",
        "_files",
        "_first",
        "_interval",
        "_next",
        "_paths",
        "_stamp",
        "context",
        "expiry",
        "serial",
        "what",
    )

    def __init__(
        self,
        build: Callable[[], ssl.SSLContext],
        files: Mapping[str, str | None],
        what: str,
        *,
        interval: float = FILE_CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._build, self.what = build, what
        self._files = {key: path for key, path in files.items() if path is not None}
        self._paths = tuple(self._files.values())
        self._interval, self._clock = interval, clock
        self._stamp = _stamp(self._paths)  # before the build: a change during it is seen later
        self.context = build()
        self._first = self.context  # what a listener starts with (see listening())
        self.expiry = _expiry(self._files)
        self._failed: _Stamp | None = None
        self._next = clock() + interval
        self.serial = next(_serials)

    @property
    def stale(self) -> bool:
        """The files changed on disk and do not load: an older set is in use."""
        return self._failed is not None

    def listening(self) -> ssl.SSLContext:
        """The context to start a listener with, the same for every caller (a reload that
        keeps the block reads no file): its SNI callback, which runs with or without a server
        name, hands each handshake to :meth:`current`."""
        if self._first.sni_callback is None:
            self._first.sni_callback = self._hand_on
        return self._first

    def _hand_on(self, conn: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: Any) -> None:
        conn.context = self.current()

    def current(self) -> ssl.SSLContext:
        """The context for a new connection (looks at the files at most once an interval)."""
        now = self._clock()
        if now >= self._next and self._paths:
            self._next = now + self._interval
            self._look()
        return self.context

    def _look(self) -> None:
        stamp = _stamp(self._paths)
        if stamp == self._stamp:
            self._failed = None  # back to what is in use (a rename undone)
            return
        try:
            context = self._build()
        except (ConfigError, OSError, ValueError) as exc:  # never out of a handshake callback
            if stamp != self._failed:
                self._failed = stamp
                log.warning(
                    "tls files changed but do not load; the previous ones stay in use: "
                    "block=%s error=%s",
                    self.what,
                    logfmt_value(str(exc)),
                )
            return
        self.context, self._stamp, self._failed = context, stamp, None
        self.expiry = _expiry(self._files)
        log.info("tls files changed; new connections use them: block=%s", self.what)


_SOURCES: weakref.WeakValueDictionary[tuple[Any, ...], ContextSource] = (
    weakref.WeakValueDictionary()
)


def shared_source(
    build: Callable[[], ssl.SSLContext],
    files: Mapping[str, str | None],
    what: str,
    *,
    interval: float = FILE_CHECK_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
) -> ContextSource:
    """The source of the block ``what`` with these files: the one already in use if there is
    one (a reload that keeps a block keeps its context), else a new one (which loads the
    files now and raises :class:`ConfigError` if they do not load)."""
    key = (what, tuple(sorted(files.items())))
    source = _SOURCES.get(key)
    if source is None:
        source = ContextSource(build, files, what, interval=interval, clock=clock)
        _SOURCES[key] = source
    return source


def live_sources() -> list[ContextSource]:
    """The blocks in use, one per place in the configuration (the newest, when a reload that
    named other files leaves the old block alive for a moment)."""
    newest: dict[str, ContextSource] = {}
    for source in list(_SOURCES.values()):
        held = newest.get(source.what)
        if held is None or source.serial > held.serial:
            newest[source.what] = source
    return [newest[what] for what in sorted(newest)]


class TLSFilesCollector(Collector):
    """``sidecar_tls_certificate_expiry_timestamp_seconds{block,file}`` and
    ``sidecar_tls_files_stale{block}``; a scrape is also a look at the files."""

    def collect(self) -> Iterator[Any]:
        expiry = GaugeMetricFamily(
            "sidecar_tls_certificate_expiry_timestamp_seconds",
            "When the first certificate in a TLS file in use expires (Unix time)",
            labels=["block", "file"],
        )
        stale = GaugeMetricFamily(
            "sidecar_tls_files_stale",
            "1 while a TLS block's files changed on disk but do not load (older ones in use)",
            labels=["block"],
        )
        for source in live_sources():
            source.current()
            for key, when in sorted(source.expiry.items()):
                expiry.add_metric([source.what, key], when)
            stale.add_metric([source.what], 1.0 if source.stale else 0.0)
        yield expiry
        yield stale
