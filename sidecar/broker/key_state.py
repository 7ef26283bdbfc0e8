"""The signing-key ring kept in ``state_dir/keys.json`` so a restart keeps the keys (and their
schedule): tokens signed before the restart still verify, and verifiers see no new ``kid``.

The file is the broker's own (mode 0600, atomic replace, see state_file.py). It holds the
private keys of the active and the next key (PKCS#8 PEM) and only the public JWK of retired
keys, which never sign again. It is read once at start and written after every change of the
ring; nothing here logs its content.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from sidecar.broker.keys import KeyRing, Schedule, SigningKey, make_signing_key
from sidecar.broker.state_file import read_private, write_atomic
from sidecar.errors import ConfigError
from sidecar.jose.rfc7518_algorithms import key_fits_algorithm

FILE_NAME = "keys.json"
VERSION = 1
KEY = "state_dir"


def state_path(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def _private_pem(key: SigningKey) -> str:
    pem: bytes = key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem.decode()


def _times(key: SigningKey) -> dict[str, float | None]:
    return {
        "published_at": key.published_at,
        "activates_at": key.activates_at,
        "retired_at": key.retired_at,
        "remove_at": key.remove_at,
    }


def ring_bytes(ring: KeyRing) -> bytes:
    def signer(key: SigningKey) -> dict[str, Any]:
        return {"kid": key.kid, "alg": key.alg, "private_pem": _private_pem(key), **_times(key)}

    doc = {
        "version": VERSION,
        "active": signer(ring.active),
        "next": signer(ring.next) if ring.next is not None else None,
        "retired": [
            {"kid": k.kid, "alg": k.alg, "public_jwk": k.public_jwk, **_times(k)}
            for k in ring.retired
        ],
    }
    return json.dumps(doc, indent=1).encode() + b"\n"


def save_ring(state_dir: str, ring: KeyRing) -> None:
    """Write the ring (blocking: call it in a thread)."""
    write_atomic(state_path(state_dir), ring_bytes(ring))


def _set_times(key: SigningKey, item: dict[str, Any]) -> SigningKey:
    for name in ("published_at", "activates_at", "retired_at", "remove_at"):
        value = item.get(name)
        if value is not None and not isinstance(value, int | float):
            raise ValueError(name)
        setattr(key, name, value)
    return key


def _signer(item: Any) -> SigningKey:
    if not isinstance(item, dict) or not isinstance(item.get("private_pem"), str):
        raise ValueError("signer")
    alg = item.get("alg")
    private = serialization.load_pem_private_key(item["private_pem"].encode(), password=None)
    if not isinstance(alg, str) or not key_fits_algorithm(private.public_key(), alg):
        raise ValueError("alg")
    key = make_signing_key(private, alg, 0.0)
    if key.kid != item.get("kid"):
        raise ValueError("kid")
    return _set_times(key, item)


def _retired(item: Any) -> SigningKey:
    if not isinstance(item, dict) or not isinstance(item.get("public_jwk"), dict):
        raise ValueError("retired")
    jwk = {str(k): str(v) for k, v in item["public_jwk"].items()}
    key = SigningKey(
        kid=str(item.get("kid")),
        alg=str(item.get("alg")),
        private_key=None,  # a retired key never signs again
        public_jwk=jwk,
        header64="",
        published_at=0.0,
    )
    if jwk.get("kid") != key.kid:
        raise ValueError("kid")
    return _set_times(key, item)


def load_ring(state_dir: str, schedule: Schedule) -> KeyRing | None:
    """The saved ring, None when there is none yet. A file that exists but cannot be used
    stops the start: silently replacing the keys is exactly what the file is there to avoid."""
    path = state_path(state_dir)
    data = read_private(path, KEY)
    if data is None:
        return None
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            raise ValueError("version")
        active = _signer(doc.get("active"))
        nxt = _signer(doc["next"]) if doc.get("next") is not None else None
        retired = [_retired(item) for item in doc.get("retired") or []]
        if active.activates_at is None:
            raise ValueError("activates_at")
    except (ValueError, TypeError, KeyError, AttributeError, UnsupportedAlgorithm):
        # Never echo the content: it holds private keys.
        raise ConfigError(
            KEY, f"a directory whose {FILE_NAME} this broker wrote (remove it to start over)", path
        ) from None
    return KeyRing.restored(schedule, active, nxt, retired)
