"""A tiny "legacy app" that calls another service through its local sidecar, forever.

    python -m sidecar.apps.legacy_client --url http://127.0.0.1:15001/orders/1 --every 5

It knows nothing about tokens: a plain HTTP GET to 127.0.0.1 (the sidecar's egress listener
adds the credentials), then one line on stdout with the status and what the other side said —
for the echo app, the identity Envoy's ext_authz passed on (``x-workload-id``); for a denial,
the reason (``x-authz-reason``)::

    frontend GET http://127.0.0.1:15001/orders/1 -> 200 app=orders as spiffe://demo.local/...
    reports GET http://127.0.0.1:15002/orders/1 -> 403 reason=policy_denied

Standard library only, so it stands for any app. ``--count N`` stops after N calls; the exit
status is 1 if any call got no HTTP answer at all (refused, timeout), else 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.client import HTTPException, HTTPResponse
from types import FrameType
from typing import Any, TextIO

#: No proxies from the environment: the sidecar is on loopback, and a legacy app that honoured
#: HTTP_PROXY would be talking to something else entirely.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def describe(status: int, headers: Any, body: bytes) -> str:
    """The interesting part of an answer: whom the echo app saw, or why it was refused."""
    parts = [str(status)]
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("headers"), dict):
        parts.append(f"app={doc.get('app')}")
        parts.append(f"as {doc['headers'].get('x-workload-id', '(no identity)')}")
    reason = headers.get("x-authz-reason") if headers is not None else None
    if reason:
        parts.append(f"reason={reason}")
    return " ".join(parts)


def call_once(url: str, timeout: float) -> tuple[bool, str]:
    """(got an HTTP answer, one-line description)."""
    try:
        response: HTTPResponse = _OPENER.open(url, timeout=timeout)
        with response:
            return True, describe(response.status, response.headers, response.read(65536))
    except urllib.error.HTTPError as exc:
        with exc:
            return True, describe(exc.code, exc.headers, exc.read(65536))
    except (OSError, HTTPException, ValueError) as exc:  # refused, timeouts, bad answers
        reason = getattr(exc, "reason", exc)
        return False, f"error: {reason}"


def run(
    url: str,
    *,
    name: str,
    every: float,
    count: int,
    timeout: float,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    out = out or sys.stdout  # looked up per call: tests (and embedders) replace sys.stdout
    failures = 0
    done = 0
    while count <= 0 or done < count:
        if done:
            sleep(every)
        ok, text = call_once(url, timeout)
        failures += not ok
        done += 1
        print(f"{name} GET {url} -> {text}", file=out, flush=True)
    return 1 if failures else 0


def _exit(signum: int, frame: FrameType | None) -> None:
    # As PID 1 of a container a process ignores SIGTERM unless it handles it: stop promptly.
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", required=True, help="e.g. http://127.0.0.1:15001/orders/1")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between calls")
    parser.add_argument("--count", type=int, default=0, help="stop after N calls (0: never)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    parser.add_argument("--name", default="legacy", help="prefix of each output line")
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        return run(
            args.url, name=args.name, every=args.every, count=args.count, timeout=args.timeout
        )
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
