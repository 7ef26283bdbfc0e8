"""Workload identity for the egress side: attestors, the DPoP key, and the token source.

* :mod:`.key` — the DPoP key pair (ES256, generated in memory at start, never written).
* :mod:`.attestors` — where tokens come from (``unix``, ``k8s``, ``file``), all behind
  ``async fetch(audience) -> IssuedToken``.
* :mod:`.rfc8693_exchange` — the sans-IO half of a token request: form, DPoP nonce challenge
  (RFC 9449 §8), token response and error response (RFC 6749 §5.1/§5.2, RFC 8693 §2.2).
* :mod:`.schedule` — the sans-IO refresh schedule (half-life with jitter, full-jitter backoff).
* :mod:`.source` — :class:`~.source.TokenSource`, one background refresher per audience.
"""
