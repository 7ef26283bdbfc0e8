"""Start and stop REAL processes (Envoy, the echo app, later the sidecar) for integration tests
and benchmarks.

Every process runs in its own session/process group, logs stdout+stderr to one file, and is
stopped with SIGTERM to the whole group, then SIGKILL. ``ManagedProcess.survivors()`` tells
whether anything of it is still alive (used by the fixtures' final assertion).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from sidecar import process_group
from sidecar.envoy_command import envoy_binary
from sidecar.envoy_config import dump_yaml
from sidecar.jose.rfc7517_jwk import jwks_json, public_jwk_dict
from sidecar.local_ports import free_port, free_port_pair

REPO_ROOT = Path(__file__).resolve().parents[2]

__all__ = [
    "REPO_ROOT",
    "EchoApp",
    "EnvoyFactory",
    "ManagedProcess",
    "envoy_binary",
    "envoy_render",
    "envoy_stats",
    "free_port",
    "free_port_pair",
    "http_request",
    "leftover_processes",
    "leftovers_of",
    "live_processes",
    "start_echo_app",
    "start_envoy",
    "started_processes",
    "validate_envoy_config",
    "wait_for_http",
    "wait_for_port",
    "write_jwks",
]

# Every ManagedProcess started in this interpreter and not yet stopped; and all ever started.
_LIVE: set[ManagedProcess] = set()
_STARTED: list[ManagedProcess] = []

# urllib without proxies from the environment: tests talk to loopback only.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER_NO_REDIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def wait_for_port(
    host: str, port: int, timeout: float = 10.0, *, process: ManagedProcess | None = None
) -> None:
    """Wait until a TCP connect to host:port succeeds; fail early if ``process`` dies."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            last = exc
        if process is not None:
            process.assert_running()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} not accepting connections after {timeout}s: {last}")
        time.sleep(0.02)


def http_request(
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 5.0,
    follow_redirects: bool = False,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with urllib (no proxies): (status, lower-cased headers, body).

    Non-2xx answers are returned, not raised. Repeated response headers are comma-joined.
    """
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    opener = _OPENER if follow_redirects else _OPENER_NO_REDIRECT
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, _lower_headers(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, _lower_headers(err.headers.items()), err.read()


def _lower_headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def wait_for_http(
    url: str,
    timeout: float = 10.0,
    expect_status: int = 200,
    *,
    process: ManagedProcess | None = None,
) -> None:
    """Poll ``url`` until it answers ``expect_status``; fail early if ``process`` dies."""
    deadline = time.monotonic() + timeout
    last: str = "no answer"
    while True:
        try:
            status, _, body = http_request(url, timeout=1.0)
            if status == expect_status:
                return
            last = f"status {status}: {body[:200]!r}"
        except (OSError, urllib.error.URLError) as exc:
            last = repr(exc)
        if process is not None:
            process.assert_running()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url} did not answer {expect_status} within {timeout}s ({last})")
        time.sleep(0.02)


class ManagedProcess:
    """A subprocess in its own process group, logging to ``<log_dir>/<name>.log``.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. ``stop`` is idempotent.
    ``env`` is laid over the current environment (it does not replace it).
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        name: str,
        log_dir: Path | str,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> None:
        self.args = [str(a) for a in args]
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.cwd = str(cwd) if cwd is not None else None
        self._popen: subprocess.Popen[bytes] | None = None
        self._pgid: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ManagedProcess:
        if self._popen is not None:
            raise RuntimeError(f"{self.name} already started")
        self._popen = process_group.spawn(
            self.args, self.log_path, env=self.env, cwd=self.cwd, append=True
        )
        self._pgid = self._popen.pid  # new session: the leader's pid is the group id
        _LIVE.add(self)
        _STARTED.append(self)
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the group, wait up to ``timeout``, then SIGKILL it. Returns the exit code."""
        popen = self._popen
        if popen is None:
            return None
        try:
            process_group.stop([popen], timeout)
            # No member left, zombies aside (pgrep -g): the session check relies on it.
            _wait_until(lambda: not self.survivors(), timeout)
        finally:
            _LIVE.discard(self)
        return popen.returncode

    def __enter__(self) -> ManagedProcess:
        if self._popen is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- inspection --------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.name} not started")
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def assert_running(self) -> None:
        if not self.is_running():
            raise RuntimeError(
                f"{self.name} exited with {self.returncode}; log:\n{self.log_text(tail=4000)}"
            )

    def log_text(self, tail: int | None = None) -> str:
        """The process's combined stdout/stderr so far (last ``tail`` characters if given)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text[-tail:] if tail is not None else text

    def survivors(self) -> list[int]:
        """Pids still alive in this process's group (``pgrep -g``), excluding zombies."""
        if self._pgid is None:
            return []
        out = subprocess.run(
            ["pgrep", "-g", str(self._pgid)], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split() if _alive(int(p))]

    def command_line_matches(self) -> list[int]:
        """Pids whose command line contains this process's exact command (``pgrep -f``)."""
        if self._popen is None:
            return []
        pattern = _ere_escape(" ".join(self.args))
        out = subprocess.run(
            ["pgrep", "-f", "--", pattern], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split() if _alive(int(p))]

    def leftover_pids(self) -> list[int]:
        """Pids alive in this group or running this exact command line."""
        return sorted(set(self.survivors()) | set(self.command_line_matches()))

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exit={self.returncode}"
        return f"<ManagedProcess {self.name} pid={self._pgid} {state}>"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state != "Z"


def _ere_escape(text: str) -> str:
    """Escape POSIX extended-regex metacharacters (for ``pgrep -f``)."""
    return "".join("\\" + c if c in ".[]()*+?{}|^$\\" else c for c in text)


def _wait_until(pred: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def live_processes() -> list[ManagedProcess]:
    """ManagedProcesses started here and not stopped yet."""
    return list(_LIVE)


def leftover_processes() -> dict[str, list[int]]:
    """For every ManagedProcess started here and stopped since: pids still alive in its group
    or running its exact command line (``pgrep -g`` / ``pgrep -f``). Empty when all is clean."""
    return leftovers_of(_STARTED)


def leftovers_of(processes: Iterable[ManagedProcess]) -> dict[str, list[int]]:
    """Like :func:`leftover_processes`, for the given processes only (live ones are skipped)."""
    # A live process may run the same command line (a port reused by a later start).
    in_use = {pid for live in _LIVE for pid in live.survivors()}
    left: dict[str, list[int]] = {}
    for proc in processes:
        if proc in _LIVE:
            continue
        pids = [pid for pid in proc.leftover_pids() if pid not in in_use]
        if pids:
            left[proc.name] = pids
    return left


def started_processes() -> list[ManagedProcess]:
    """Every ManagedProcess started in this interpreter, in start order."""
    return list(_STARTED)


# -- Envoy -----------------------------------------------------------------------------------


def validate_envoy_config(
    path: Path | str, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate -c path``; the caller checks returncode and output."""
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "warning"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_envoy(
    config: dict[str, Any],
    tmp_path: Path,
    admin_port: int,
    *,
    name: str | None = None,
    concurrency: int = 1,
    log_level: str = "warning",
    extra_args: Sequence[str] = (),
    timeout: float = 15.0,
) -> ManagedProcess:
    """Write ``config`` as YAML under ``tmp_path``, start Envoy, wait for admin ``/ready``.

    ``admin_port`` must be the admin port inside ``config``; it also gives the ``--base-id``,
    unique among concurrently running Envoys. Hot restart is disabled, so no shared memory is
    left in /dev/shm after the process is killed.
    """
    name = name or f"envoy-{admin_port}"
    cfg_path = Path(tmp_path) / f"{name}.yaml"
    cfg_path.write_text(dump_yaml(config))
    args = [
        envoy_binary(),
        "-c",
        str(cfg_path),
        "--concurrency",
        str(concurrency),
        "--base-id",
        str(admin_port),
        "--disable-hot-restart",
        "-l",
        log_level,
        *extra_args,
    ]
    proc = ManagedProcess(args, name=name, log_dir=tmp_path).start()
    try:
        wait_for_http(f"http://127.0.0.1:{admin_port}/ready", timeout, process=proc)
        # /ready from the admin port alone can be a stale answer (another process there, this
        # Envoy exiting on a bind failure); a test then sees only "connection refused".
        for host, port in _tcp_listeners(config):
            wait_for_port(host, port, timeout, process=proc)
        proc.assert_running()
    except BaseException:
        proc.stop()
        raise
    return proc


def _tcp_listeners(config: dict[str, Any]) -> list[tuple[str, int]]:
    """(host to connect to, port) of each static TCP listener with a fixed port."""
    out: list[tuple[str, int]] = []
    for listener in config.get("static_resources", {}).get("listeners", []):
        sock = listener.get("address", {}).get("socket_address")
        if sock and sock.get("port_value"):
            host = sock.get("address", "127.0.0.1")
            host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
            out.append((host, int(sock["port_value"])))
    return out


def envoy_stats(admin_port: int, filter_regex: str | None = None) -> dict[str, int]:
    """Counters and gauges from the admin ``/stats`` endpoint, as ``{name: value}``."""
    url = f"http://127.0.0.1:{admin_port}/stats"
    if filter_regex:
        url += "?filter=" + urllib.parse.quote(filter_regex)
    status, _, body = http_request(url)
    if status != 200:
        raise RuntimeError(f"{url}: {status}")
    stats: dict[str, int] = {}
    for line in body.decode().splitlines():
        key, sep, value = line.partition(": ")
        if sep and value.strip().lstrip("-").isdigit():
            stats[key] = int(value)
    return stats


# -- echo app --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EchoApp:
    """A running echo app (see :func:`start_echo_app`)."""

    name: str
    port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests_seen(self) -> list[str]:
        """Access-log lines of requests other than the health check (needs --access-log)."""
        return [
            line
            for line in self.process.log_text().splitlines()
            if '"' in line and "/__health" not in line
        ]


EnvoyFactory = Callable[[dict[str, Any], int], ManagedProcess]


def start_echo_app(
    port: int,
    tmp_path: Path,
    name: str = "app",
    *,
    host: str = "127.0.0.1",
    access_log: bool = True,
    timeout: float = 15.0,
) -> ManagedProcess:
    """Run ``python -m sidecar.apps.echo`` on host:port and wait for ``/__health``."""
    args = [sys.executable, "-m", "sidecar.apps.echo", "--host", host, "--port", str(port)]
    args += ["--name", name]
    if access_log:
        args.append("--access-log")
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    }
    proc = ManagedProcess(
        args, name=f"echo-{name}-{port}", log_dir=tmp_path, env=env, cwd=REPO_ROOT
    ).start()
    try:
        wait_for_http(f"http://{host}:{port}/__health", timeout, process=proc)
    except BaseException:
        proc.stop()
        raise
    return proc


# -- the Envoy renderer and a JWKS for jwt_authn ----------------------------------------------


@functools.cache
def envoy_render() -> ModuleType:
    """envoy/render.py, loaded by path: envoy/ is not a package (``envoy`` is the xds-protos
    namespace)."""
    path = REPO_ROOT / "envoy" / "render.py"
    spec = importlib.util.spec_from_file_location("_envoy_render", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jwks(path: Path) -> Path:
    """A JWKS with one EC P-256 public key (jwt_authn refuses an empty or missing JWKS)."""
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_text(jwks_json([public_jwk_dict(key, alg="ES256", kid="test")]))
    return path
