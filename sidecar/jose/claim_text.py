"""Which client-supplied strings (claims, header parameters) are acceptable at all.

They end up in decisions, HTTP headers for the app (``x-workload-id``) and log lines: a
control character there could split a header or forge a log line, so one is refused outright.
"""

from __future__ import annotations


def acceptable_text(value: str) -> bool:
    """True for a string without control characters (C0, DEL, C1 and other non-printables)."""
    return value.isprintable()
