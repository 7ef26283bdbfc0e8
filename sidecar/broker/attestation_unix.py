"""Unix workload attestation: who is on the other end of the attestation socket.

The kernel records the connecting process's credentials at ``connect()``; we read them when
the connection is accepted (``SO_PEERCRED``: pid, uid, gid), together with

* a pidfd for that very process (``SO_PEERPIDFD``, Linux ≥ 6.5), and
* its start time (``/proc/PID/stat`` field 22, in clock ticks since boot).

Per request we then read ``/proc/PID/exe`` (the resolved executable path) and, if any entry
needs it, the SHA-256 of the executable — hashed through ``/proc/PID/exe`` itself, so it is the
file the process actually runs even if the path was replaced since, in a thread, cached by
(device, inode, size, mtime, ctime).

The PID-reuse race: the caller may exit and its pid be given to another process between
``connect()`` and our reads of ``/proc/PID``. After reading (and hashing) we therefore check
that the pidfd's process is still alive (a live process keeps its pid: no reuse possible) and
that ``/proc/PID`` still shows the start time seen at accept. Any doubt refuses the request.

The uid and gid are those of the caller at ``connect()``; supplementary groups are not used.
A broker that runs unprivileged can only read ``/proc/PID/exe`` of processes of its own user:
for others, ``unix:path``/``unix:sha256`` selectors are simply absent (entries needing them do
not match), and the audit record says the executable was unreadable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from sidecar.broker.codes import BrokerReason, BrokerRefusal
from sidecar.broker.registry import unix_selectors

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5 (include/uapi/asm-generic)
_UCRED = struct.Struct("3i")
_HASH_CHUNK = 1 << 20


class AttestationFailure(BrokerRefusal):
    """The caller could not be attested."""


@dataclass(frozen=True, slots=True)
class PeerCreds:
    pid: int
    uid: int
    gid: int
    starttime: int | None  # None: the process was already gone when we looked
    pidfd: int | None


@dataclass(frozen=True, slots=True)
class UnixEvidence:
    pid: int
    uid: int
    gid: int
    exe: str | None
    sha256: str | None
    selectors: frozenset[str]


def read_starttime(pid: int, proc: str = "/proc") -> int | None:
    try:
        fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data.rsplit(b")", 1)[-1].split()
    try:
        return int(fields[19])  # field 22, counting from field 3 at index 0
    except (IndexError, ValueError):
        return None


def read_peer(sock: Any, proc: str = "/proc") -> PeerCreds:
    """Credentials of a connected AF_UNIX stream socket's peer (raises OSError)."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    pidfd: int | None = None
    with contextlib.suppress(OSError):
        pidfd = struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
    return PeerCreds(pid, uid, gid, read_starttime(pid, proc) if pid > 0 else None, pidfd)


def pidfd_alive(pidfd: int | None) -> bool:
    """True if the process the pidfd refers to has not been reaped (None: cannot tell, so
    the start-time check alone decides)."""
    if pidfd is None:
        return True
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; we may just not signal it
    except OSError:
        return False
    return True


def peer_uid(transport: Any) -> int | None:
    """The uid the kernel recorded for the peer at ``connect()`` (None if unreadable): the key
    of the attestation socket's per-uid connection cap, read before anything else."""
    sock = transport.get_extra_info("socket")
    try:
        return int(
            _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]
        )
    except (OSError, AttributeError):
        return None


class PeerTracker:
    """Credentials per accepted connection, captured when it is admitted (the connection caps
    live in :mod:`sidecar.net_limits`; each connection here holds a pidfd)."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self._peers: dict[Any, PeerCreds | OSError] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def accepted(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        try:
            self._peers[transport] = read_peer(sock, self.proc)
        except (OSError, AttributeError) as exc:
            self._peers[transport] = OSError(str(exc))

    def lost(self, transport: Any) -> None:
        peer = self._peers.pop(transport, None)
        if isinstance(peer, PeerCreds) and peer.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(peer.pidfd)

    def peer(self, transport: Any) -> PeerCreds:
        found = self._peers.get(transport)
        if isinstance(found, PeerCreds):
            return found
        raise AttestationFailure(
            BrokerReason.NO_PEER_CREDENTIALS, f"cannot read SO_PEERCRED ({found})"
        )


def _hash_file(path: str, key: tuple[int, ...]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        if _stat_key(before) != key:
            raise OSError("executable changed while being opened")
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
        if _stat_key(os.fstat(f.fileno())) != key:
            raise OSError("executable changed while being hashed")
    return digest.hexdigest()


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class UnixAttestor:
    """Turns peer credentials into selectors (see the module docstring)."""

    def __init__(self, *, needs_sha256: bool, proc: str = "/proc", cache_size: int = 1024):
        self.needs_sha256 = needs_sha256
        self.proc = proc
        self.cache_size = cache_size
        self._hashes: OrderedDict[tuple[int, ...], str] = OrderedDict()
        self._inflight: dict[tuple[int, ...], asyncio.Future[str]] = {}

    async def attest(self, peer: PeerCreds) -> UnixEvidence:
        if peer.pid <= 0:
            # SO_PEERCRED reports pid 0 for a process outside our pid namespace (another
            # container): with no /proc/<pid> to check we refuse rather than attest on
            # uid/gid alone, and say how to fix it: that is the mistake containers make.
            raise AttestationFailure(
                BrokerReason.NO_PEER_CREDENTIALS,
                "the peer has no pid in the broker's pid namespace (a process in another "
                "container? run it in the broker's pid namespace, e.g. pid: service:broker)",
            )
        if peer.starttime is None:
            raise AttestationFailure(
                BrokerReason.PEER_GONE, f"process {peer.pid} exited before attestation"
            )
        exe_link = f"{self.proc}/{peer.pid}/exe"
        try:
            exe: str | None = os.readlink(exe_link)
        except OSError:
            exe = None  # not ours to inspect (another user, unprivileged broker) or gone
        sha256 = None
        if exe is not None and self.needs_sha256:
            sha256 = await self._hash(exe_link)
        # Re-check after every read of /proc/PID: same process, not a reused pid.
        if not pidfd_alive(peer.pidfd) or read_starttime(peer.pid, self.proc) != peer.starttime:
            raise AttestationFailure(
                BrokerReason.PEER_CHANGED,
                f"process {peer.pid} exited or its pid was reused during attestation",
            )
        return UnixEvidence(
            pid=peer.pid,
            uid=peer.uid,
            gid=peer.gid,
            exe=exe,
            sha256=sha256,
            selectors=unix_selectors(uid=peer.uid, gid=peer.gid, path=exe, sha256=sha256),
        )

    async def _hash(self, exe_link: str) -> str | None:
        try:
            key = _stat_key(os.stat(exe_link))
        except OSError:
            return None
        cached = self._hashes.get(key)
        if cached is not None:
            self._hashes.move_to_end(key)
            return cached
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(_hash_file, exe_link, key))
            self._inflight[key] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(key, None))
        try:
            digest = await asyncio.shield(pending)
        except OSError:
            return None
        self._hashes[key] = digest
        if len(self._hashes) > self.cache_size:
            self._hashes.popitem(last=False)
        return digest
