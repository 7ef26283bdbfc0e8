"""TLS settings shared by every outbound fetch and by the broker's listener.

A client block (``tls:`` under an egress upstream, an issuer, a trust domain, the revocation
list, the identity section or a broker cluster)::

    tls:
      ca_file: /etc/sidecar/ca.pem        # PEM bundle trusted for the server (default: system)
      cert_file: /etc/sidecar/client.pem  # client certificate (mTLS), with key_file
      key_file: /etc/sidecar/client.key
      server_name: orders.internal        # name checked in the server's certificate (and SNI)

A server block (the broker's ``tls:``) has ``cert_file``, ``key_file`` and optionally
``client_ca_file`` (then every client must present a certificate issued by it).

The blocks are read by ``sidecar.config_util`` (``parse_tls_client`` and friends). Files are
read and parsed when a block is first loaded, so a missing or broken file is a configuration
error that names the key, not a failed handshake later; an equal block loaded again (a
reload) shares the running one and its files' state. Verification is always on and TLS 1.2 is the
least version offered: there is deliberately no setting to turn either off.

Certificates rotated in place on disk are picked up for new connections without a restart
(:mod:`sidecar.tls_rotation`).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sidecar.errors import ConfigError
from sidecar.tls_rotation import FILE_CHECK_INTERVAL, ContextSource, shared_source


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ValueError("encrypted private keys are not supported")


def _readable(path: str, key: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(key, f"a readable PEM file ({exc.strerror})", path) from None


def _load_ca(ctx: ssl.SSLContext, ca_file: str, key: str) -> None:
    _readable(ca_file, key)
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise ConfigError(
            key, f"a PEM file of CA certificates (it does not parse: {exc.reason})", ca_file
        ) from None


def _load_chain(
    ctx: ssl.SSLContext, cert_file: str, key_file: str, cert_key: str, key_key: str
) -> None:
    _readable(cert_file, cert_key)
    _readable(key_file, key_key)
    try:
        ctx.load_cert_chain(cert_file, key_file, password=_no_password)
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None)
        if not isinstance(exc, ssl.SSLError):
            why = str(exc)
        elif reason == "KEY_VALUES_MISMATCH":
            why = "it does not match the certificate"
        else:
            why = "the certificate or the key does not parse as PEM" + (
                f": {reason}" if reason else ""
            )
        raise ConfigError(
            key_key,
            f"the unencrypted PEM private key of the certificate in {cert_key} ({why})",
            key_file,
        ) from None


def _base(*, server: bool = False, system_trust: bool = False) -> ssl.SSLContext:
    if system_trust:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Every client and server here speaks HTTP/1.1 (aiohttp).
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def client_context(
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    *,
    path: str = "tls",
) -> ssl.SSLContext:
    """A verifying client context: ``ca_file`` or the system's trust store (which honours
    ``SSL_CERT_FILE``/``SSL_CERT_DIR``), and a client certificate when given."""
    # With ca_file only those CAs: a private PKI's servers are not vouched for by public ones.
    ctx = _base(system_trust=ca_file is None)
    if ca_file is not None:
        _load_ca(ctx, ca_file, f"{path}.ca_file")
    if cert_file is not None and key_file is not None:
        _load_chain(ctx, cert_file, key_file, f"{path}.cert_file", f"{path}.key_file")
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    return ctx


_DEFAULT: ssl.SSLContext | None = None


def default_client_context() -> ssl.SSLContext:
    """The context of an https fetch without a ``tls`` block (built once: loading the system
    store takes milliseconds)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = client_context()
    return _DEFAULT


@dataclass(frozen=True, slots=True)
class TLSClient:
    """A validated client block and the context built from it (rebuilt when its files
    change: see :class:`~sidecar.tls_rotation.ContextSource`). Equal blocks name the same
    files, and share one source."""

    source: ContextSource = field(compare=False, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    @classmethod
    def load(
        cls,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        server_name: str | None = None,
        *,
        path: str = "tls",
        interval: float = FILE_CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> TLSClient:
        files = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
        source = shared_source(
            lambda: client_context(ca_file, cert_file, key_file, path=path),
            files,
            path,
            interval=interval,
            clock=clock,
        )
        return cls(source, ca_file, cert_file, key_file, server_name)

    @property
    def context(self) -> ssl.SSLContext:
        return self.source.current()

    def request_options(self) -> dict[str, Any]:
        """Keywords for an aiohttp request (ignored by aiohttp for ``http://`` URLs)."""
        if self.server_name is None:
            return {"ssl": self.context}
        return {"ssl": self.context, "server_hostname": self.server_name}


def request_options(tls: TLSClient | None) -> dict[str, Any]:
    """aiohttp request keywords for ``tls``, or for system trust when there is no block."""
    return {"ssl": default_client_context()} if tls is None else tls.request_options()


@dataclass(frozen=True, slots=True)
class TLSServer:
    """A listener's block. ``context`` is what the listener starts with; new connections get
    the files as they are now, so a rotated certificate or client CA needs no restart (see
    :meth:`~sidecar.tls_rotation.ContextSource.listening`)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None
    context: ssl.SSLContext = field(compare=False, repr=False)

    @classmethod
    def load(
        cls,
        cert_file: str,
        key_file: str,
        client_ca_file: str | None = None,
        *,
        path: str = "tls",
        interval: float = FILE_CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> TLSServer:
        files = {"cert_file": cert_file, "key_file": key_file, "client_ca_file": client_ca_file}
        source = shared_source(
            lambda: server_context(cert_file, key_file, client_ca_file, path=path),
            files,
            path,
            interval=interval,
            clock=clock,
        )
        return cls(cert_file, key_file, client_ca_file, source.listening())


def server_context(
    cert_file: str, key_file: str, client_ca_file: str | None, *, path: str = "tls"
) -> ssl.SSLContext:
    """A listener's context; with ``client_ca_file`` every client must present a certificate
    issued by those CAs."""
    ctx = _base(server=True)
    _load_chain(ctx, cert_file, key_file, f"{path}.cert_file", f"{path}.key_file")
    if client_ca_file is not None:
        _load_ca(ctx, client_ca_file, f"{path}.client_ca_file")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def tls_failure(exc: BaseException) -> str:
    """A short, loggable account of a failed TLS connection (aiohttp or ssl exception)."""
    cert_error = getattr(exc, "certificate_error", None)  # ClientConnectorCertificateError
    if isinstance(cert_error, ssl.SSLCertVerificationError):
        why = cert_error.verify_message or cert_error.reason or "verification failed"
        return f"TLS: the server's certificate is not trusted ({why}; see tls.ca_file)"
    inner = getattr(exc, "os_error", exc)
    reason = getattr(inner, "reason", None) or type(inner).__name__
    return f"TLS handshake failed ({reason})"
