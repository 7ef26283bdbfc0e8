"""Files the broker keeps across restarts (revocations, signing keys, run-time entries):
written whole to a temporary file in the same directory, fsynced, renamed over the old one, so
a crash leaves the old or the new content, never a torn one; mode 0600 (``mkstemp``)."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile

from sidecar.errors import ConfigError


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` (blocking: it fsyncs; call it in a thread)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def own_directory(path: str, key: str, mode: int, *, shown: str | None = None) -> None:
    """Create ``path`` with ``mode`` if missing; it must be a real directory owned by our user
    and writable by nobody else: otherwise another user could swap a socket or file we trust
    for their own. Errors name ``key`` and show ``shown`` (the configured value)."""
    value = shown or path
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        problem = f"a path whose directory can be created ({exc.strerror})"
        raise ConfigError(key, problem, value) from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        problem = "a path in a directory owned by the broker's user and writable by no other"
        raise ConfigError(key, problem, value)


def read_private(path: str, key: str) -> bytes | None:
    """The content of ``path``, None when it does not exist; a file other users can read or
    write is refused (it may hold private keys, and must be the broker's own)."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(key, f"a readable state file ({exc.strerror})", path) from None
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ConfigError(key, "a state file of the broker's user with mode 0600", path)
    return data
