"""The broker's signing keys and their rotation schedule (pure: the clock is passed in).

Life of a key::

    generated ──(published as NEXT)──> prepublish s ──> ACTIVE (signs) ──> rotate_every s
        ──> RETIRED (still published) ──> max token TTL + grace ──> removed from the JWKS

* The next key is in the JWKS for at least ``prepublish`` seconds before it signs anything,
  so every verifier that refreshes its key set at least that often already holds it when the
  first token it signed arrives (no "unknown kid" round trip on the hot path).
* A retired key stays published until every token it signed has expired: it signed its last
  token at retirement, and no token lives longer than the longest configured TTL.
* ``kid`` is the key's RFC 7638 thumbprint: stable, derived from the key, never reused.

Private keys live only in :class:`SigningKey` objects whose ``repr`` leaves them out; nothing
here logs or serializes one.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sidecar.errors import ConfigError
from sidecar.jose.b64 import b64url_encode
from sidecar.jose.rfc7517_jwk import public_jwk_dict
from sidecar.jose.rfc7518_algorithms import key_fits_algorithm
from sidecar.jose.rfc7638_thumbprint import jwk_thumbprint

SIGNING_ALGORITHMS = ("ES256", "ES384", "Ed25519", "EdDSA", "RS256", "PS256")
RSA_BITS = 2048
#: import_jwks (and most verifiers) refuse larger sets; the schedule must fit.
MAX_PUBLISHED_KEYS = 64


def generate_private_key(alg: str) -> Any:
    """A fresh private key for ``alg`` (RSA generation takes ~0.1 s: call it in a thread)."""
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg in ("Ed25519", "EdDSA"):
        return ed25519.Ed25519PrivateKey.generate()
    if alg in ("RS256", "PS256"):
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise ValueError(f"unsupported signing algorithm {alg!r}")


def load_private_key(path: str, alg: str, key: str = "keys.key_file") -> Any:
    """Load a PEM private key (PKCS#8 or traditional, unencrypted) that fits ``alg``."""
    try:
        st = os.stat(path)
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"a readable PEM file ({exc.strerror})", path) from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(key, "a key file no other user can read (chmod 600)", path)
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # Never echo the content: it is (or looks like) private key material.
        raise ConfigError(key, "an unencrypted PEM private key", path) from None
    if not hasattr(private, "public_key") or not key_fits_algorithm(private.public_key(), alg):
        raise ConfigError(key, f"a private key usable with keys.algorithm {alg}", path)
    return private


@dataclass(eq=False, slots=True)
class SigningKey:
    kid: str
    alg: str
    private_key: Any = field(repr=False)
    public_jwk: dict[str, str]
    #: base64url of the fixed JWS header {"alg", "kid", "typ": "at+jwt"} (RFC 9068 §2.1).
    header64: str
    published_at: float
    activates_at: float | None = None
    retired_at: float | None = None
    remove_at: float | None = None


def make_signing_key(private_key: Any, alg: str, now: float) -> SigningKey:
    jwk = public_jwk_dict(private_key)
    kid = jwk_thumbprint(jwk)
    public = {**jwk, "kid": kid, "alg": alg, "use": "sig"}
    header = {"alg": alg, "kid": kid, "typ": "at+jwt"}
    return SigningKey(
        kid=kid,
        alg=alg,
        private_key=private_key,
        public_jwk=public,
        header64=b64url_encode(json.dumps(header, separators=(",", ":")).encode()),
        published_at=now,
    )


@dataclass(frozen=True, slots=True)
class Schedule:
    alg: str
    rotate_every: float  # 0: never rotate
    prepublish: float
    #: How long a retired key stays published: the longest token TTL plus a grace for
    #: verifiers' clock skew.
    retain_for: float

    def published_keys_bound(self) -> int:
        """How many keys the JWKS can hold at once under this schedule."""
        if self.rotate_every <= 0:
            return 1
        return 2 + int(-(-self.retain_for // self.rotate_every))


@dataclass(frozen=True, slots=True)
class KeyEvent:
    event: str  # key_published | key_activated | key_retired | key_removed
    kid: str
    alg: str


class KeyRing:
    """Active, next and retired keys; ``version`` changes whenever the JWKS does."""

    def __init__(self, schedule: Schedule, first: SigningKey, now: float) -> None:
        self.schedule = schedule
        first.activates_at = now
        self.active = first
        self.next: SigningKey | None = None
        self.retired: list[SigningKey] = []
        self.version = 0
        self._jwks: bytes | None = None

    @classmethod
    def restored(
        cls,
        schedule: Schedule,
        active: SigningKey,
        nxt: SigningKey | None,
        retired: list[SigningKey],
    ) -> KeyRing:
        """A ring as it was saved (see key_state.py); its times are kept."""
        assert active.activates_at is not None
        ring = cls(schedule, active, active.activates_at)
        ring.next = nxt
        ring.retired = list(retired)
        ring._changed()
        return ring

    def retire_active(self, replacement: SigningKey, now: float) -> list[KeyEvent]:
        """Sign with ``replacement`` from now on: the active key is retired (still published
        for the tokens it signed) and a next key that never signed is dropped."""
        old, dropped = self.active, self.next
        old.retired_at = now
        old.remove_at = now + self.schedule.retain_for
        replacement.activates_at = now
        self.retired.append(old)
        self.active, self.next = replacement, None
        self._changed()
        events = [KeyEvent("key_activated", replacement.kid, replacement.alg)]
        events.append(KeyEvent("key_retired", old.kid, old.alg))
        if dropped is not None:
            events.append(KeyEvent("key_removed", dropped.kid, dropped.alg))
        return events

    # -- schedule ---------------------------------------------------------------------------

    def next_key_due(self, now: float) -> bool:
        """True when a next key should be generated and published now."""
        s = self.schedule
        if s.rotate_every <= 0 or self.next is not None:
            return False
        assert self.active.activates_at is not None
        return now >= self.active.activates_at + s.rotate_every - s.prepublish

    def publish_next(self, key: SigningKey, now: float) -> KeyEvent:
        """Publish ``key``; it signs no earlier than ``prepublish`` seconds from now."""
        if self.next is not None:
            raise RuntimeError("a next key is already published")
        assert self.active.activates_at is not None
        key.published_at = now
        key.activates_at = max(
            self.active.activates_at + self.schedule.rotate_every, now + self.schedule.prepublish
        )
        self.next = key
        self._changed()
        return KeyEvent("key_published", key.kid, key.alg)

    def advance(self, now: float) -> list[KeyEvent]:
        """Promote the next key when its time has come; drop retired keys past their life."""
        events: list[KeyEvent] = []
        nxt = self.next
        if nxt is not None and nxt.activates_at is not None and now >= nxt.activates_at:
            old = self.active
            old.retired_at = now
            old.remove_at = now + self.schedule.retain_for
            self.retired.append(old)
            self.active, self.next = nxt, None
            events += [KeyEvent("key_activated", nxt.kid, nxt.alg)]
            events += [KeyEvent("key_retired", old.kid, old.alg)]
        keep = [k for k in self.retired if k.remove_at is None or k.remove_at > now]
        for gone in self.retired:
            if gone not in keep:
                events.append(KeyEvent("key_removed", gone.kid, gone.alg))
        if len(keep) != len(self.retired) or any(e.event == "key_activated" for e in events):
            self.retired = keep
            self._changed()
        return events

    def next_wakeup(self, now: float) -> float:
        """Seconds until the schedule next has something to do (for the rotation task)."""
        s = self.schedule
        times: list[float] = [k.remove_at for k in self.retired if k.remove_at is not None]
        if self.next is not None and self.next.activates_at is not None:
            times.append(self.next.activates_at)
        elif s.rotate_every > 0 and self.active.activates_at is not None:
            times.append(self.active.activates_at + s.rotate_every - s.prepublish)
        return max(0.0, min(times) - now) if times else 3600.0

    # -- publication ------------------------------------------------------------------------

    def published(self) -> list[SigningKey]:
        keys = [self.active]
        if self.next is not None:
            keys.append(self.next)
        return keys + self.retired

    def jwks_bytes(self) -> bytes:
        if self._jwks is None:
            doc = {"keys": [k.public_jwk for k in self.published()]}
            self._jwks = json.dumps(doc, separators=(",", ":")).encode()
        return self._jwks

    def _changed(self) -> None:
        self.version += 1
        self._jwks = None
