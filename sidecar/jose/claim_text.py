"""Which client-supplied strings (claims, header parameters) are acceptable at all.

They end up in decisions, HTTP headers for the app (``x-workload-id``) and log lines: a
control character there could split a header or forge a log line, and a non-ASCII one could
look like another identity (homoglyphs) or be encoded differently by the app's framework, so
both are refused outright: visible ASCII and space only.
"""

from __future__ import annotations


def acceptable_text(value: str) -> bool:
    """True for printable ASCII (0x20-0x7e): no control character, no non-ASCII."""
    return value.isascii() and value.isprintable()
