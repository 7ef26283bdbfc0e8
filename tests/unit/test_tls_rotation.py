"""Certificates rotated on disk are used for new connections without a restart
(sidecar.tls_settings.ContextSource): real handshakes over loopback sockets, files replaced
the way a Kubernetes secret volume or cert-manager replaces them, the clock passed in."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

from sidecar.errors import ConfigError
from sidecar.tls_rotation import ContextSource, TLSFilesCollector
from sidecar.tls_settings import TLSClient, TLSServer, client_context
from tests.tls_pki import LocalPKI, make_pki

INTERVAL = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Live:
    """The files a block names; ``install`` replaces them (write aside, then rename)."""

    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def server(self, clock: Clock, path: str = "tls") -> TLSServer:
        """The listener block naming these files (server.pem/.key, ca.pem for clients)."""
        files = (self.path("server.pem"), self.path("server.key"), self.path("ca.pem"))
        return TLSServer.load(*files, path=path, interval=INTERVAL, clock=clock)

    def client(self, clock: Clock, path: str = "tls") -> TLSClient:
        """The client block naming these files (ca.pem, client.pem/.key)."""
        files = (self.path("ca.pem"), self.path("client.pem"), self.path("client.key"))
        return TLSClient.load(*files, path=path, interval=INTERVAL, clock=clock)

    def install(self, pki: LocalPKI, *names: str) -> None:
        sources = {
            "ca.pem": pki.ca_file,
            "server.pem": pki.server_cert,
            "server.key": pki.server_key,
            "client.pem": pki.client_cert,
            "client.key": pki.client_key,
        }
        for name in names or tuple(sources):
            tmp = self.dir / f".{name}.tmp"
            shutil.copyfile(sources[name], tmp)
            os.replace(tmp, self.dir / name)


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalPKI, LocalPKI]:
    base = tmp_path_factory.mktemp("rotation")
    return make_pki(base / "one", "one"), make_pki(base / "two", "two", days=2)


@pytest.fixture
def live(tmp_path: Path, pkis: tuple[LocalPKI, LocalPKI]) -> Live:
    files = Live(tmp_path)
    files.install(pkis[0])
    return files


@pytest.fixture
def clock() -> Clock:
    return Clock()


@contextmanager
def _serve(context: ssl.SSLContext) -> Iterator[int]:
    """A TLS server on a thread: each connection gets the subject CN of the client's
    certificate (or "-") and is closed."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                try:
                    with context.wrap_socket(conn, server_side=True) as tls:
                        peer: Any = tls.getpeercert() or {}
                        names = [
                            v
                            for rdn in peer.get("subject", ())
                            for k, v in rdn
                            if k == "commonName"
                        ]
                        tls.sendall((names[0] if names else "-").encode())
                except (ssl.SSLError, OSError):
                    pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        listener.close()
        thread.join(5)


def _call(port: int, context: ssl.SSLContext) -> str:
    """What the server says, or the TLS failure's class name."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            return tls.recv(100).decode() or "closed"
    except (ssl.SSLError, ConnectionError) as exc:
        return type(exc).__name__


def _client_of(pki: LocalPKI) -> ssl.SSLContext:
    return client_context(str(pki.ca_file), str(pki.client_cert), str(pki.client_key))


def test_a_listener_takes_new_certificates_and_client_cas_for_new_connections(
    live: Live, pkis: tuple[LocalPKI, LocalPKI], clock: Clock
) -> None:
    one, two = pkis
    tls = live.server(clock)
    listening = tls.context
    with _serve(listening) as port:
        assert _call(port, _client_of(one)) == "sidecar client"
        assert _call(port, _client_of(two)) == "SSLCertVerificationError"

        live.install(two)
        clock.now += INTERVAL - 0.1  # not looked at yet
        assert _call(port, _client_of(one)) == "sidecar client"

        clock.now += 0.1
        assert _call(port, _client_of(two)) == "sidecar client"
        # The old server certificate is gone, and so is trust in the old client CA.
        assert _call(port, _client_of(one)) == "SSLCertVerificationError"
        old_client_cert = client_context(
            str(two.ca_file), str(one.client_cert), str(one.client_key)
        )
        assert _call(port, old_client_cert) in ("SSLError", "ConnectionResetError", "closed")
        assert tls.context is listening  # the listener keeps the one it started with


def test_a_client_block_takes_a_rotated_certificate_and_ca(
    live: Live, pkis: tuple[LocalPKI, LocalPKI], clock: Clock
) -> None:
    one, two = pkis
    tls = live.client(clock)
    with (
        _serve(one.server_context(require_client_cert=True)) as port_one,
        _serve(two.server_context(require_client_cert=True)) as port_two,
    ):
        first = tls.context
        assert _call(port_one, tls.context) == "sidecar client"
        assert _call(port_two, tls.context) == "SSLCertVerificationError"

        live.install(two)
        assert tls.context is first  # within the interval: not even looked at
        clock.now += INTERVAL
        assert tls.context is not first
        assert tls.request_options() == {"ssl": tls.context}
        assert _call(port_two, tls.context) == "sidecar client"
        assert _call(port_one, tls.context) == "SSLCertVerificationError"


def test_files_that_do_not_load_keep_the_previous_context_until_they_do(
    live: Live,
    pkis: tuple[LocalPKI, LocalPKI],
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, two = pkis
    tls = live.client(clock, path="egress.upstreams[0].tls")
    first = tls.context
    caplog.set_level(logging.INFO, "sidecar.tls_rotation")

    live.install(two, "client.key")  # the key first: it does not match the certificate
    for _ in range(3):
        clock.now += INTERVAL
        assert tls.context is first
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per change, not once per look
    message = warnings[0].getMessage()
    assert "egress.upstreams[0].tls.key_file" in message and "does not match" in message
    assert "PRIVATE KEY" not in message

    (live.dir / "client.pem").unlink()  # a missing file is the same: the old context stays
    clock.now += INTERVAL
    assert tls.context is first
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2

    live.install(two, "client.pem", "ca.pem")
    clock.now += INTERVAL
    assert tls.context is not first
    assert "new connections use them: block=egress.upstreams[0].tls" in caplog.text


def test_unchanged_files_are_not_loaded_again(live: Live, clock: Clock) -> None:
    built: list[ssl.SSLContext] = []

    def build() -> ssl.SSLContext:
        built.append(client_context(live.path("ca.pem")))
        return built[-1]

    source = ContextSource(
        build, {"ca_file": live.path("ca.pem")}, "x.tls", interval=1, clock=clock
    )
    for _ in range(5):
        clock.now += 1
        assert source.current() is built[0]
    assert len(built) == 1
    os.utime(live.path("ca.pem"), ns=(1, 1))  # same bytes, new mtime: loaded again
    clock.now += 1
    assert source.current() is built[1]


def test_files_that_do_not_load_at_start_are_a_configuration_error(
    live: Live, pkis: tuple[LocalPKI, LocalPKI]
) -> None:
    live.install(pkis[1], "server.key")
    with pytest.raises(ConfigError, match=r"tls\.key_file"):
        TLSServer.load(live.path("server.pem"), live.path("server.key"))


def test_equal_blocks_share_one_source(live: Live) -> None:
    # What a configuration reload compares: the same place and paths are the same block,
    # kept with its rotation state, whatever the files hold now.
    a = TLSClient.load(live.path("ca.pem"), path="identity.tls")
    b = TLSClient.load(live.path("ca.pem"), path="identity.tls")
    assert a == b and a.source is b.source
    assert a != TLSClient.load(live.path("ca.pem"), server_name="orders.internal")
    assert TLSClient.load(live.path("ca.pem"), path="authz.issuers[0].tls").source is not a.source


def _not_after(path: Path | str) -> float:
    return x509.load_pem_x509_certificate(Path(path).read_bytes()).not_valid_after_utc.timestamp()


def _scrape(block: str) -> tuple[dict[str, float], float | None]:
    """This block's series from a fresh registry: {file: expiry}, stale."""
    registry = CollectorRegistry()
    registry.register(TLSFilesCollector())
    expiry: dict[str, float] = {}
    stale: float | None = None
    for family in registry.collect():
        for sample in family.samples:
            if sample.labels.get("block") != block:
                continue
            if sample.name == "sidecar_tls_certificate_expiry_timestamp_seconds":
                expiry[sample.labels["file"]] = sample.value
            elif sample.name == "sidecar_tls_files_stale":
                assert stale is None, "one series per block"
                stale = sample.value
    return expiry, stale


def test_metrics_show_the_expiry_in_use_and_files_that_do_not_load(
    live: Live, pkis: tuple[LocalPKI, LocalPKI], clock: Clock
) -> None:
    one, two = pkis
    block = f"broker-{id(live)}.tls"
    tls = live.server(clock, path=block)
    assert tls.context is not None
    in_use = {"cert_file": _not_after(one.server_cert), "client_ca_file": _not_after(one.ca_file)}
    assert _scrape(block) == (in_use, 0.0)

    live.install(two, "server.key")  # does not match the certificate: the old set stays
    clock.now += INTERVAL
    assert _scrape(block) == (in_use, 1.0)  # the scrape itself looked at the files

    live.install(two, "server.pem", "ca.pem")
    clock.now += INTERVAL
    now_in_use = {
        "cert_file": _not_after(two.server_cert),
        "client_ca_file": _not_after(two.ca_file),
    }
    assert _scrape(block) == (now_in_use, 0.0)
    assert now_in_use["cert_file"] > in_use["cert_file"] + 86_000  # two days against one


def test_only_live_blocks_are_reported(live: Live) -> None:
    block = f"gone-{id(live)}.tls"
    tls = TLSClient.load(live.path("ca.pem"), path=block)
    assert _scrape(block)[1] == 0.0
    del tls
    gc.collect()
    assert _scrape(block) == ({}, None)


def test_a_reload_while_files_are_half_rotated_keeps_the_listener(
    live: Live, pkis: tuple[LocalPKI, LocalPKI], clock: Clock
) -> None:
    # A broker reload (new registration entries, same tls block) must not read the files
    # again: a key written before its certificate would refuse the whole reload.
    block = f"half-{id(live)}.tls"
    first = live.server(clock, path=block)
    live.install(pkis[1], "server.key")
    again = live.server(clock, path=block)
    assert again == first and again.context is first.context
