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
from collections.abc import Callable
from typing import Any, TypeVar

from sidecar.authz.core import Authorizer, DecisionFlow, IORequest, advance
from sidecar.authz.decision import Decision, Deny, RequestView
from sidecar.errors import ReplayStoreUnavailable
from sidecar.observability.metrics import AuthzMetrics

S = TypeVar("S")


class Check:
    """One check in progress: its start time, its flow, the flow's last step and the request
    (for the decision log; None when building the view failed)."""

    __slots__ = ("flow", "start", "step", "view")

    def __init__(
        self,
        start: float,
        flow: DecisionFlow | None,
        step: IORequest | Decision,
        view: RequestView | None = None,
    ):
        self.start = start
        self.flow = flow
        self.step = step
        self.view = view


class CheckGuard:
    def __init__(self, authorizer: Authorizer, metrics: AuthzMetrics | None, transport: str):
        self.authorizer = authorizer
        self.metrics = metrics
        self.transport = transport
        # Decisions are logged per transport: sidecar.authz.grpc, sidecar.authz.http.
        self.log = logging.getLogger(f"sidecar.authz.{transport}")

    def begin(self, view_of: Callable[[S], RequestView], source: S) -> Check:
        """Start the timer and run the flow up to its first I/O request (or its decision).
        ``view_of(source)`` runs inside the guard: a failure there also denies."""
        start = time.perf_counter()
        view = None
        try:
            view = view_of(source)
            flow, step = self.authorizer.start(view, self.authorizer.clock())
            return Check(start, flow, step, view)
        except Exception:
            return Check(start, None, self._failed(), view)

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
        log_decision(self.log, decision, check.view, self.transport)
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
        self.log.exception("ext_authz %s check failed; denying", self.transport)
        return self.authorizer.internal_error("authorizer error")


def log_decision(
    log: logging.Logger, decision: Decision, view: RequestView | None, transport: str
) -> None:
    """One line per check: a deny at INFO, an allow at DEBUG (nothing is built for an allow
    unless debug logging is on: the allow path stays cheap). Ids only (sub, jti, kid), never
    a token or a proof; the formatter escapes every value (CWE-117)."""
    if decision.reason is None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("decision", extra={"fields": decision_fields(decision, view, transport)})
        return
    if log.isEnabledFor(logging.INFO):
        log.info("decision", extra={"fields": decision_fields(decision, view, transport)})


#: Decision metadata worth a field: who, which token and proof, which key, which rule.
_META_FIELDS = ("sub", "token_jti", "proof_jti", "kid", "rule")


def decision_fields(
    decision: Decision, view: RequestView | None, transport: str
) -> list[tuple[str, object]]:
    """The decision log's fields, in a fixed order: ``result``, ``reason`` and ``status`` (a
    deny), ``transport``, the request's ``method``, ``host``, ``path`` (without the query
    string, which may carry secrets) and ``request_id`` (Envoy's ``x-request-id``), then
    ``sub``, ``token_jti``, ``proof_jti``, ``kid``, ``rule`` when known, and a deny's
    ``detail``."""
    fields: list[tuple[str, object]]
    if isinstance(decision, Deny):
        reason = decision.reason.value
        fields = [("result", "deny"), ("reason", reason), ("status", decision.status)]
    else:
        fields = [("result", "allow")]
    fields.append(("transport", transport))
    if view is not None:
        fields += (
            ("method", view.method),
            ("host", view.authority),
            ("path", view.path.partition("?")[0]),
        )
        request_id = view.headers.get("x-request-id")
        if request_id is not None:
            fields.append(("request_id", request_id))
    meta = decision.metadata
    fields += ((k, meta[k]) for k in _META_FIELDS if k in meta)
    if isinstance(decision, Deny):
        fields.append(("detail", decision.detail))
    return fields
