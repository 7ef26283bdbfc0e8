"""The revocation list's wire protocol, shared by its publisher (the broker) and its readers
(the verifiers): the long-poll preference and the change-time header."""

from __future__ import annotations

from collections.abc import Iterable

#: When the list last changed, in Unix seconds: a verifier measures propagation with it.
CHANGED_HEADER = "Sidecar-List-Changed"

#: Upper bound of a long-poll hold, either side: longer, a request would outlive common proxy
#: and client timeouts.
MAX_WAIT = 60


def wait_preference(values: Iterable[str]) -> int | None:
    """The ``wait`` preference (RFC 7240 §4.3, delta-seconds) in ``Prefer`` or
    ``Preference-Applied`` header values, possibly among other preferences and parameters
    (``respond-async, wait=10``); None when absent or not delta-seconds."""
    for header in values:
        for preference in header.split(","):
            name, _, value = preference.split(";", 1)[0].partition("=")
            if name.strip().lower() != "wait":
                continue
            value = value.strip().strip('"')
            return int(value) if value.isdigit() and len(value) <= 9 else None
    return None
