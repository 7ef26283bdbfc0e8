"""Values from outside (claims, headers, key ids) in log lines, escaped so that one request can
never write a line of its own or fake a field (CWE-117).

logfmt style: a plain value (visible ASCII without ``"``, ``\\`` or ``=``) is written bare;
anything else is double-quoted, with ``"`` and ``\\`` backslash-escaped and every character
outside visible ASCII (controls, DEL, non-ASCII) written as ``\\xNN`` (``\\uNNNN`` above 0xff),
so log lines stay ASCII and one line per event. Long values are cut at ``limit`` characters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MAX_VALUE = 256
_PLAIN = re.compile(r"[!#-<>-\[\]-~]+")  # 0x21-0x7e without '"' '=' '\'


def _escape_char(c: str) -> str:
    code = ord(c)
    if c in '"\\':
        return "\\" + c
    if 0x20 <= code < 0x7F:
        return c
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def logfmt_value(value: object, limit: int = MAX_VALUE) -> str:
    """One value, safe to put after ``key=`` in a log line."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit and _PLAIN.fullmatch(text):
        return text
    cut = len(text) > limit
    body = "".join(_escape_char(c) for c in text[:limit])
    return f'"{body}..."' if cut else f'"{body}"'


def logfmt(fields: Iterable[tuple[str, object]]) -> str:
    """``key=value`` pairs joined by spaces; keys are ours, values are escaped."""
    return " ".join(f"{key}={logfmt_value(value)}" for key, value in fields)
