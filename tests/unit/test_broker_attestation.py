"""Attestors without sockets: the Unix attestor against a fake ``/proc`` tree (so the PID-reuse
check can be provoked), and the Kubernetes service-account mapping."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from sidecar.broker.attestation_k8s import SubjectTokenError, service_account_of
from sidecar.broker.attestation_unix import (
    AttestationFailure,
    PeerCreds,
    UnixAttestor,
    read_starttime,
)
from sidecar.broker.codes import BrokerReason, BrokerRefusal

PID = 4242


def stat_line(starttime: int, comm: str = "py (x) y") -> str:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
    # stime cutime cstime priority nice threads itrealvalue starttime ...
    rest = ["S", "1", "1", "1", "0", "-1", "0"] + ["0"] * 12 + [str(starttime)] + ["0"] * 10
    return f"{PID} ({comm}) " + " ".join(rest) + "\n"


@pytest.fixture
def proc(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "proc"
    (root / str(PID)).mkdir(parents=True)
    exe = tmp_path / "bin" / "workload"
    exe.parent.mkdir()
    exe.write_bytes(b"\x7fELF pretend binary")
    (root / str(PID) / "stat").write_text(stat_line(777))
    os.symlink(exe, root / str(PID) / "exe")
    return root, exe


def test_read_starttime_survives_odd_command_names(proc: tuple[Path, Path]) -> None:
    root, _ = proc
    assert read_starttime(PID, str(root)) == 777
    assert read_starttime(PID + 1, str(root)) is None


def test_unix_attestation_yields_selectors_and_caches_the_hash(proc: tuple[Path, Path]) -> None:
    root, exe = proc
    attestor = UnixAttestor(needs_sha256=True, proc=str(root))
    peer = PeerCreds(pid=PID, uid=1000, gid=100, starttime=777, pidfd=None)
    evidence = asyncio.run(attestor.attest(peer))
    digest = hashlib.sha256(exe.read_bytes()).hexdigest()
    assert evidence.exe == str(exe) and evidence.sha256 == digest
    assert evidence.selectors == {
        "unix:uid:1000",
        "unix:gid:100",
        f"unix:path:{exe}",
        f"unix:sha256:{digest}",
    }
    assert len(attestor._hashes) == 1
    asyncio.run(attestor.attest(peer))
    assert len(attestor._hashes) == 1, "same file: hashed once"
    # A rewritten binary (new mtime/size) is hashed again.
    exe.write_bytes(b"\x7fELF another binary!")
    assert asyncio.run(attestor.attest(peer)).sha256 == hashlib.sha256(exe.read_bytes()).hexdigest()


def test_no_hash_when_no_entry_needs_one(proc: tuple[Path, Path]) -> None:
    root, exe = proc
    evidence = asyncio.run(
        UnixAttestor(needs_sha256=False, proc=str(root)).attest(PeerCreds(PID, 1, 1, 777, None))
    )
    assert evidence.sha256 is None and evidence.exe == str(exe)


def test_a_reused_pid_is_refused(proc: tuple[Path, Path]) -> None:
    """The connecting process had start time 776; /proc/PID now shows another process."""
    root, _ = proc
    attestor = UnixAttestor(needs_sha256=True, proc=str(root))
    with pytest.raises(AttestationFailure) as err:
        asyncio.run(attestor.attest(PeerCreds(PID, 1000, 100, 776, None)))
    assert err.value.reason == "peer_changed"


def test_a_gone_peer_is_refused(proc: tuple[Path, Path]) -> None:
    root, _ = proc
    attestor = UnixAttestor(needs_sha256=False, proc=str(root))
    with pytest.raises(AttestationFailure) as err:
        asyncio.run(attestor.attest(PeerCreds(PID, 1000, 100, None, None)))
    assert err.value.reason == "peer_gone"
    with pytest.raises(AttestationFailure) as err:
        asyncio.run(attestor.attest(PeerCreds(0, 1000, 100, 1, None)))
    assert err.value.reason == "no_peer_credentials"


def test_a_peer_in_another_pid_namespace_is_refused_with_a_hint(tmp_path: Path) -> None:
    """SO_PEERCRED gives pid 0 for a process in another pid namespace (another container,
    even with a uid an entry selects): refused, and the detail says how to fix the setup."""
    attestor = UnixAttestor(needs_sha256=False, proc=str(tmp_path))
    with pytest.raises(AttestationFailure) as err:
        asyncio.run(attestor.attest(PeerCreds(0, 1001, 1001, None, None)))
    assert err.value.reason == "no_peer_credentials"
    assert "pid namespace" in err.value.detail and "pid: service:broker" in err.value.detail


def test_unreadable_exe_leaves_only_uid_and_gid(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    (root / str(PID)).mkdir(parents=True)
    (root / str(PID) / "stat").write_text(stat_line(5))
    evidence = asyncio.run(
        UnixAttestor(needs_sha256=True, proc=str(root)).attest(PeerCreds(PID, 7, 8, 5, None))
    )
    assert evidence.exe is None and evidence.sha256 is None
    assert evidence.selectors == {"unix:uid:7", "unix:gid:8"}


K8S = {"namespace": "shop", "serviceaccount": {"name": "frontend", "uid": "u"}}


@pytest.mark.parametrize(
    ("claims", "sub", "expected"),
    [
        ({}, "system:serviceaccount:shop:frontend", ("shop", "frontend")),
        ({"kubernetes.io": K8S}, "system:serviceaccount:shop:frontend", ("shop", "frontend")),
        ({"kubernetes.io": K8S}, "some-other-subject", ("shop", "frontend")),
    ],
)
def test_service_account_mapping(
    claims: dict[str, object], sub: str, expected: tuple[str, str]
) -> None:
    assert service_account_of(claims, sub) == expected


@pytest.mark.parametrize(
    ("claims", "sub"),
    [
        ({}, "alice"),
        ({}, "system:serviceaccount:shop"),
        ({}, "system:serviceaccount:shop:frontend:extra"),
        ({}, "system:serviceaccount:Shop:frontend"),
        ({"kubernetes.io": K8S}, "system:serviceaccount:shop:backend"),
        ({"kubernetes.io": "shop"}, "system:serviceaccount:shop:frontend"),
        ({"kubernetes.io": {"namespace": "shop"}}, "x"),
    ],
)
def test_not_a_service_account(claims: dict[str, object], sub: str) -> None:
    with pytest.raises(SubjectTokenError) as err:
        service_account_of(claims, sub)
    assert err.value.reason == "not_service_account"


@pytest.mark.parametrize("cls", [AttestationFailure, SubjectTokenError])
def test_both_attestation_errors_are_the_one_refusal_class(cls: type[BrokerRefusal]) -> None:
    err = cls(BrokerReason.NOT_SERVICE_ACCOUNT, "sub is not a service account")
    assert isinstance(err, BrokerRefusal)
    assert err.reason is BrokerReason.NOT_SERVICE_ACCOUNT
    assert err.detail == "sub is not a service account"
    assert str(err) == "not_service_account: sub is not a service account"


def test_a_subject_token_error_may_be_ours_to_retry() -> None:
    assert not SubjectTokenError(BrokerReason.NOT_SERVICE_ACCOUNT, "x").retryable
    assert SubjectTokenError(BrokerReason.NOT_SERVICE_ACCOUNT, "x", retryable=True).retryable
