"""Process logging: one line per event on stderr, key=value, never a token or a key."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("SIDECAR_LOG_LEVEL") or "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log would print every request: our decisions are logged already.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
