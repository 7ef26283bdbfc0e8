"""The egress proxy: a legacy app calls ``http://127.0.0.1:<port>/...`` and the call leaves with
``Authorization: DPoP <token>`` and a fresh DPoP proof (RFC 9449) for that exact request.

* :mod:`.config` — the ``egress`` section.
* :mod:`.headers` — sans-IO header rules: hop-by-hop (RFC 9110 §7.6.1), ``X-Forwarded-*``,
  ``Via``, the app's own ``Authorization``.
* :mod:`.nonce` — sans-IO: ``WWW-Authenticate`` challenge parsing, the per-origin nonce cache.
* :mod:`.proxy` — the aiohttp servers (one per upstream, plus the forward proxy) and client.
"""
