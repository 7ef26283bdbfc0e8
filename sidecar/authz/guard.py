"""The one guarded entry every ext_authz transport calls: the timer, the fail-closed
``internal_error``, the metric and the decision log are written here once.

A check is run as far as it can go without I/O on the caller's thread (:meth:`CheckGuard.begin`);
most checks end there. A check that needs I/O (a key refresh, an asynchronous replay store) is
resumed by its driver with :meth:`CheckGuard.resume`: the event loop (:meth:`CheckGuard.check`)
or a worker thread (the threaded gRPC engine). :meth:`CheckGuard.end` counts and logs it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from sidecar.authz.core import Authorizer, DecisionFlow, IORequest, advance
from sidecar.authz.decision import Decision, RequestView
from sidecar.errors import ReplayStoreUnavailable
from sidecar.observability.logsafe import logfmt, logfmt_value
from sidecar.observability.metrics import AuthzMetrics

log = logging.getLogger(__name__)

S = TypeVar("S")


class Check:
    """One check in progress: its start time, its flow and the flow's last step."""

    __slots__ = ("flow", "start", "step")

    def __init__(self, start: float, flow: DecisionFlow | None, step: IORequest | Decision):
        self.start = start
        self.flow = flow
        self.step = step


class CheckGuard:
    def __init__(self, authorizer: Authorizer, metrics: AuthzMetrics | None, transport: str):
        self.authorizer = authorizer
        self.metrics = metrics
        self.transport = transport

    def begin(self, view_of: Callable[[S], RequestView], source: S) -> Check:
        """Start the timer and run the flow up to its first I/O request (or its decision).
        ``view_of(source)`` runs inside the guard: a failure there also denies."""
        start = time.perf_counter()
        try:
            flow = self.authorizer.decision_flow(view_of(source), self.authorizer.clock())
            return Check(start, flow, advance(flow))
        except Exception:
            return Check(start, None, self._failed())

    def resume(self, check: Check, reply: Any, error: Exception | None = None) -> None:
        """Send the answer to the flow's I/O request (or the error it raised)."""
        assert check.flow is not None
        try:
            check.step = advance(check.flow, reply, error)
        except Exception:
            check.step = self._failed()

    def fail(self, check: Check) -> None:
        """The driver could not finish the I/O (a bug, a cancelled task): deny."""
        check.step = self._failed()

    def end(self, check: Check) -> Decision:
        """Count and log the decision once; returns it for the transport to render."""
        decision = check.step
        assert not isinstance(decision, IORequest)
        if self.metrics is not None:
            self.metrics.record(self.transport, decision, time.perf_counter() - check.start)
        log_decision(decision)
        return decision

    async def check(self, view_of: Callable[[S], RequestView], source: S) -> Decision:
        """The whole check on the event loop."""
        check = self.begin(view_of, source)
        await self.finish_io(check)
        return self.end(check)

    async def finish_io(self, check: Check) -> None:
        """Carry out the flow's I/O requests on the event loop until it decides."""
        while isinstance(check.step, IORequest):
            try:
                reply = await self.authorizer.perform(check.step)
            except ReplayStoreUnavailable as exc:
                self.resume(check, None, exc)
            except Exception:
                self.fail(check)
            else:
                self.resume(check, reply)

    def _failed(self) -> Decision:
        # Fail closed: a bug in the core must deny, never allow or crash the call.
        log.exception("ext_authz %s check failed; denying", self.transport)
        return self.authorizer.internal_error("authorizer error")


def log_decision(decision: Decision) -> None:
    """One line per deny with ids only (jti, kid, sub), never a token; allows at debug."""
    if decision.reason is None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("allow %s", _ids(decision.metadata))
        return
    log.info(
        "deny reason=%s %s detail=%s",
        decision.reason.value,
        _ids(decision.metadata),
        logfmt_value(decision.detail),
    )


def _ids(meta: Mapping[str, Any]) -> str:
    # Client-supplied values: escaped so that a request cannot forge a log line (CWE-117).
    return logfmt((k, meta[k]) for k in ("sub", "token_jti", "proof_jti", "kid") if k in meta)
