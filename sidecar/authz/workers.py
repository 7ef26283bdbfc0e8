"""``authz.workers: N``: N authorizer processes under one ``sidecar authz`` parent.

Each worker is a full authorizer (``sidecar authz --worker``) with its own gRPC and HTTP
listeners (port + index, or socket path + ``.index``): Envoy keeps one HTTP/2 connection per
upstream host, so a shared SO_REUSEPORT port would pin all checks to one process; instead
``sidecar envoy-config --authz-workers N`` lists every worker as an endpoint.

The parent

* hands each worker its settings on stdin, one JSON line: the parsed configuration, its index,
  and the nonce secret (one secret for all, so a nonce issued by one worker is accepted by
  every other; generated here when none is configured, never logged or written to disk), then
  keeps stdin open: a worker that reads end-of-file (the parent died, even by SIGKILL) stops;
* reloads on SIGHUP (or a change of the file, ``--watch-config``): the parent re-reads and
  validates the file, then writes the new settings line to every worker's stdin, and each
  worker swaps them in (:meth:`AuthzService.reload`). A pipe rather than a forwarded signal:
  every worker applies exactly what the parent validated, with the same nonce secret, and a
  worker restarted later starts with it. Workers ignore SIGHUP themselves;
* gives the workers one replay store (``replay.backend: memory``): an LMDB map in a private
  0700 directory on /dev/shm, atomic across processes (see ``replay_lmdb``);
* restarts a worker that exits, with exponential backoff (0.1 s doubling to 5 s, reset after
  30 s of uptime), and counts it (``sidecar_authz_worker_restarts_total``);
* on SIGTERM/SIGINT sends SIGTERM to every worker, waits ``STOP_GRACE`` s, kills what is
  left and removes its directory. Workers ignore SIGINT (a terminal's Ctrl-C reaches the whole
  process group; only the parent decides);
* serves ``admin.listen``: ``/healthz`` (the parent runs), ``/readyz`` (200 once every worker
  was ready, then while at least one is), ``/metrics`` (every worker's metrics with a
  ``worker`` label, gathered from each worker's admin socket at scrape time, plus the
  parent's own). Nothing is shared on the request path: a decision costs what it costs in a
  single process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sidecar.authz.config import AuthzConfig, parse_authz_config
from sidecar.config_source import from_json_object, to_json_ready
from sidecar.listen_address import ListenAddress

log = logging.getLogger(__name__)

STOP_GRACE = 5.0
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET_AFTER = 0.1, 5.0, 30.0
START_TIMEOUT = 30.0
SCRAPE_TIMEOUT = 2.0
MAX_SETTINGS_BYTES = 4 * 1024 * 1024


# -- what a worker is told -------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    data: dict[str, Any]  # the whole configuration file, environment overrides applied
    index: int
    count: int
    runtime_dir: str
    sha256: str = ""  # of the configuration file these settings come from

    def encode(self) -> bytes:
        doc = {
            "data": to_json_ready(self.data),
            "index": self.index,
            "count": self.count,
            "runtime_dir": self.runtime_dir,
            "sha256": self.sha256,
        }
        return json.dumps(doc).encode() + b"\n"

    @classmethod
    def read(cls, stream: Any) -> WorkerSettings:
        return cls.decode(stream.readline(MAX_SETTINGS_BYTES))

    @classmethod
    def decode(cls, line: bytes) -> WorkerSettings:
        doc = json.loads(line, object_hook=from_json_object)
        return cls(
            doc["data"],
            int(doc["index"]),
            int(doc["count"]),
            str(doc["runtime_dir"]),
            str(doc.get("sha256", "")),
        )

    def admin_socket(self) -> str:
        return admin_socket(self.runtime_dir, self.index)

    def replay_dir(self) -> str:
        return replay_dir(self.runtime_dir)


def admin_socket(runtime_dir: str, index: int) -> str:
    return os.path.join(runtime_dir, f"admin.{index}.sock")


def replay_dir(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, "replay")


def nonce_secret_configured(data: dict[str, Any]) -> bool:
    nonce = (data.get("authz") or {}).get("nonce") or {}
    return isinstance(nonce, dict) and (
        nonce.get("secret") is not None or nonce.get("secret_file") is not None
    )


def with_shared_secret(data: dict[str, Any], cfg: AuthzConfig, generated: str) -> dict[str, Any]:
    """``data`` with ``authz.nonce.secret`` set to the one secret all workers use: the
    configured one (from ``secret`` or ``secret_file``, same bytes) or ``generated``."""
    configured = nonce_secret_configured(data)
    authz = dict(data.get("authz") or {})
    nonce = dict(authz.get("nonce") or {})
    nonce.pop("secret_file", None)
    nonce["secret"] = cfg.nonce_secret.decode() if configured else generated
    authz["nonce"] = nonce
    return {**data, "authz": authz}


def worker_config(settings: WorkerSettings) -> AuthzConfig:
    """The worker's configuration: the parent's, with this worker's own listeners."""
    cfg = parse_authz_config(settings.data.get("authz"))

    def own(address: ListenAddress | None) -> ListenAddress | None:
        return None if address is None else address.for_worker(settings.index, settings.count)

    return replace(cfg, grpc_listen=own(cfg.grpc_listen), http_listen=own(cfg.http_listen))


# -- the parent ------------------------------------------------------------------------------


class PoolRegistry(CollectorRegistry):
    """The parent's registry: its own metrics plus the families last scraped from the
    workers. A family both have (file descriptors, admin connections) is rendered once,
    the workers' samples carrying their ``worker`` label next to the parent's."""

    def __init__(self) -> None:
        super().__init__()
        self.worker_families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for family in super().collect():
            merged[family.name] = family
        for family in self.worker_families:
            own = merged.get(family.name)
            if own is None:
                merged[family.name] = family
            elif own.type == family.type:
                combined = Metric(own.name, own.documentation, own.type, own.unit)
                combined.samples = [*own.samples, *family.samples]
                merged[family.name] = combined
        yield from merged.values()


def merge_worker_metrics(texts: dict[int, str]) -> list[Metric]:
    """Prometheus text from each worker → one family per name, samples labelled ``worker``."""
    merged: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for sample in family.samples:
                labels = {"worker": str(index), **sample.labels}
                target.samples.append(sample._replace(labels=labels))
    return list(merged.values())


class WorkerPool:
    def __init__(
        self,
        data: dict[str, Any],
        cfg: AuthzConfig,
        registry: PoolRegistry,
        argv: list[str],
        sha256: str = "",
    ) -> None:
        """``argv`` starts a worker once ``--worker`` is appended; ``sha256`` is the file's."""
        self.argv = argv
        self.count = cfg.workers
        self.cfg = cfg
        self._generated_secret = secrets.token_urlsafe(32)  # when none is configured
        self.data = with_shared_secret(data, cfg, self._generated_secret)
        self.sha256 = sha256
        self.runtime_dir = tempfile.mkdtemp(prefix="sidecar-authz-", dir=_tmpfs())
        os.chmod(self.runtime_dir, 0o700)
        log.info("authz workers: %d, runtime directory %s", self.count, self.runtime_dir)
        self.procs: list[asyncio.subprocess.Process | None] = [None] * self.count
        self.ever_ready = [False] * self.count
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._started = [asyncio.Event() for _ in range(self.count)]
        self._sessions: list[aiohttp.ClientSession] = []
        self.restarts = Counter(
            "sidecar_authz_worker_restarts",
            "Authorizer worker processes restarted after they exited",
            ["worker"],
            registry=registry,
        )
        Gauge(
            "sidecar_authz_workers", "Authorizer worker processes running", registry=registry
        ).set_function(lambda: sum(p is not None and p.returncode is None for p in self.procs))
        self.registry = registry

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._sessions = [
            aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=admin_socket(self.runtime_dir, i)),
                timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT),
            )
            for i in range(self.count)
        ]
        self._tasks = [asyncio.create_task(self._keep_running(i)) for i in range(self.count)]
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await asyncio.gather(*(e.wait() for e in self._started))
        except TimeoutError:
            raise RuntimeError(
                f"authz workers did not start within {START_TIMEOUT:.0f} s"
            ) from None

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        live = [p for p in self.procs if p is not None and p.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_GRACE):
                await asyncio.gather(*(p.wait() for p in live))
        for proc in live:
            if proc.returncode is None:
                log.warning(
                    "authz worker pid %d did not stop in %.0f s: killed", proc.pid, STOP_GRACE
                )
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for session in self._sessions:
            await session.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _settings(self, index: int) -> bytes:
        return WorkerSettings(self.data, index, self.count, self.runtime_dir, self.sha256).encode()

    async def reload(self, data: dict[str, Any], cfg: AuthzConfig, sha256: str) -> None:
        """Forward a validated configuration to every worker (and to any started later)."""
        self.cfg, self.sha256 = cfg, sha256
        self.data = with_shared_secret(data, cfg, self._generated_secret)
        for index, proc in enumerate(self.procs):
            if proc is not None and proc.returncode is None and proc.stdin is not None:
                proc.stdin.write(self._settings(index))
        for proc in self.procs:
            if proc is not None and proc.stdin is not None:
                with contextlib.suppress(ConnectionError):
                    await proc.stdin.drain()

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *self.argv, "--worker", stdin=asyncio.subprocess.PIPE
        )
        assert proc.stdin is not None
        # The settings of now (a reload during the exec is not missed), and the process
        # listed before the first await: a reload from then on writes to it too.
        proc.stdin.write(self._settings(index))  # stays open: its end-of-file stops the worker
        self.procs[index] = proc
        with contextlib.suppress(ConnectionError):
            await proc.stdin.drain()
        return proc

    async def _keep_running(self, index: int) -> None:
        backoff = BACKOFF_FIRST
        while not self._stopping:
            proc = self.procs[index] = await self._spawn(index)
            born = time.monotonic()
            waiter = asyncio.create_task(self._wait_started(index, proc))
            code = await proc.wait()
            waiter.cancel()
            if self._stopping:
                return
            log.warning(
                "authz worker %d (pid %d) exited with %s; restarting in %.1f s",
                index,
                proc.pid,
                _describe(code),
                backoff,
            )
            self.restarts.labels(str(index)).inc()
            if time.monotonic() - born > BACKOFF_RESET_AFTER:
                backoff = BACKOFF_FIRST
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _wait_started(self, index: int, proc: asyncio.subprocess.Process) -> None:
        """A worker has started once its admin socket answers (it binds that last)."""
        while proc.returncode is None:
            if await self._get(index, "/healthz") is not None:
                self._started[index].set()
                return
            await asyncio.sleep(0.05)

    # -- admin -------------------------------------------------------------------------------

    async def _get(self, index: int, path: str) -> tuple[int, str] | None:
        try:
            async with self._sessions[index].get(f"http://worker{path}") as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    async def readiness(self) -> tuple[bool, str]:
        answers = await asyncio.gather(*(self._get(i, "/readyz") for i in range(self.count)))
        ready = [a is not None and a[0] == 200 for a in answers]
        for i, ok in enumerate(ready):
            self.ever_ready[i] |= ok
        states = [
            f"worker {i}: " + ("ready" if ok else (a[1].strip() if a else "not answering"))
            for i, (ok, a) in enumerate(zip(ready, answers, strict=True))
        ]
        return all(self.ever_ready) and any(ready), "; ".join(states)

    async def scrape(self) -> None:
        answers = await asyncio.gather(*(self._get(i, "/metrics") for i in range(self.count)))
        texts = {i: a[1] for i, a in enumerate(answers) if a is not None and a[0] == 200}
        self.registry.worker_families = merge_worker_metrics(texts)


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def _tmpfs() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


# -- a worker's lifeline ---------------------------------------------------------------------


class ParentPipe:
    """A worker's stdin, after its first settings line: each further line is new settings (a
    reload), end-of-file means the parent is gone (the worker stops)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._latest: WorkerSettings | None = None
        #: Told that new settings arrived (:meth:`take` them).
        self.on_settings: Callable[[], None] = lambda: None

    def first(self) -> WorkerSettings:
        """The settings the worker starts with (read before the event loop runs). Read with
        os.read, not a buffered reader, so that nothing after the first line is lost."""
        stdin = sys.stdin.buffer.fileno()
        while b"\n" not in self._buffer:
            chunk = os.read(stdin, 65536)
            if not chunk or len(self._buffer) > MAX_SETTINGS_BYTES:
                raise SystemExit("authz worker: no settings from the parent on stdin")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return WorkerSettings.decode(line)

    def take(self) -> WorkerSettings | None:
        latest, self._latest = self._latest, None
        return latest

    async def closed(self) -> None:
        """Returns at end-of-file (the parent died, even by SIGKILL, or stopped us)."""
        loop = asyncio.get_running_loop()
        eof = asyncio.Event()
        stdin = sys.stdin.buffer.fileno()

        def on_stdin() -> None:
            chunk = os.read(stdin, 65536)
            if not chunk:
                loop.remove_reader(stdin)
                eof.set()
                return
            self._feed(chunk)

        self._feed(b"")  # what arrived with the first line
        loop.add_reader(stdin, on_stdin)
        try:
            await eof.wait()
        finally:
            loop.remove_reader(stdin)

    def _feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            try:
                self._latest = WorkerSettings.decode(line)
            except (ValueError, KeyError, TypeError):
                log.error("authz worker: unreadable settings from the parent; ignored")
                continue
            self.on_settings()
        if len(self._buffer) > MAX_SETTINGS_BYTES:  # bounded, like the first line
            log.error("authz worker: settings from the parent too large; ignored")
            self._buffer = b""
