"""The token source: one background refresher per audience, and the lookup requests use.

Requests call :meth:`TokenSource.current` (synchronous, no I/O): the cached token if it is
usable, else None — then :meth:`TokenSource.get`, which joins the fetch in flight (single
flight: one request to the issuer however many requests wait) or starts one if the schedule
allows an on-demand fetch, and gives up after ``request_wait`` with :class:`NoValidToken`. A
request never waits on the issuer while a usable token is cached, and never gets an unusable
one. The decisions (when, whether) are :mod:`sidecar.identity.schedule`'s; this module only
sleeps and does the I/O, with the clock and random source passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sidecar.identity.attestors import Attestor
from sidecar.identity.errors import IdentityCode, IdentityError, NoValidToken
from sidecar.identity.metrics import IdentityMetrics
from sidecar.identity.schedule import AudienceState, RefreshPolicy
from sidecar.identity.token import IssuedToken
from sidecar.observability.logs import RateLimitedLog

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Slot:
    state: AudienceState
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: asyncio.Task[None] | None = None
    task: asyncio.Task[None] | None = None


class TokenSource:
    """Owns the attestor and one refresher task per audience. Use ``async with`` or
    :meth:`start` / :meth:`close`."""

    def __init__(
        self,
        attestor: Attestor,
        policy: RefreshPolicy,
        audiences: list[str],
        *,
        metrics: IdentityMetrics | None = None,
        clock: Callable[[], float] = time.time,
        draw: Callable[[], float] = random.random,
        log_interval: float = 30.0,
    ) -> None:
        self.attestor = attestor
        self.policy = policy
        self.prefetch = list(dict.fromkeys(audiences))
        self._metrics = metrics
        self._clock = clock
        self._draw = draw
        self._slots: dict[str, _Slot] = {}
        self._closed = False
        # At most one failure line per audience per interval, however fast fetches fail.
        self._failures_log = RateLimitedLog(log, log_interval, clock=clock)
        if metrics is not None:
            metrics.watch_expiry(self._expiry_snapshot)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start a refresher per configured audience; each fetches at once (prefetch)."""
        for audience in self.prefetch:
            self._slot(audience)

    async def close(self) -> None:
        self._closed = True
        tasks: list[asyncio.Task[None]] = []
        for slot in self._slots.values():
            for task in (slot.task, slot.inflight):
                if task is not None:
                    task.cancel()
                    tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.attestor.close()

    async def __aenter__(self) -> TokenSource:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- lookups --------------------------------------------------------------------------

    def current(self, audience: str) -> IssuedToken | None:
        """The cached token for ``audience`` if it may be sent now. No I/O, no waiting."""
        slot = self._slots.get(audience)
        return None if slot is None else slot.state.usable(self._clock())

    async def get(self, audience: str) -> IssuedToken:
        """A usable token, waiting (at most ``request_wait``) for a fetch when none is cached.
        Raises NoValidToken with the reason when there is none to send."""
        slot = self._slot(audience)
        now = self._clock()
        token = slot.state.usable(now)
        if token is not None:
            return token
        if slot.inflight is None:
            if not slot.state.may_fetch_on_demand(now):
                raise self._no_token(slot)
            self._start_fetch(slot, "demand")
        inflight = slot.inflight
        assert inflight is not None
        try:
            await asyncio.wait_for(asyncio.shield(inflight), self.policy.request_wait)
        except TimeoutError:
            raise NoValidToken(
                audience,
                f"the issuer has not answered within {self.policy.request_wait:g}s; "
                + slot.state.unavailable_reason(self._clock()),
            ) from None
        token = slot.state.usable(self._clock())
        if token is None:
            raise self._no_token(slot)
        return token

    def _no_token(self, slot: _Slot) -> NoValidToken:
        state = slot.state
        return NoValidToken(
            state.audience, state.unavailable_reason(self._clock()), state.last_error
        )

    def readiness(self) -> tuple[bool, str]:
        """Ready once every configured audience has had a token (latched: an issuer outage
        later shows in the 503 answers and metrics, not by pulling the workload out)."""
        missing = [a for a in self.prefetch if not self._slot(a).state.ever_had_token]
        if missing:
            return False, "no token yet for audience(s): " + ", ".join(missing)
        return True, "ready"

    def status(self) -> list[dict[str, Any]]:
        """Per audience: claims (unverified), expiry, last error — never the token."""
        now = self._clock()
        out = []
        for audience, slot in self._slots.items():
            state = slot.state
            token = state.token
            entry: dict[str, Any] = {
                "audience": audience,
                "usable": state.usable(now) is not None,
                "fetches": state.fetches,
                "consecutive_failures": state.failures,
                "next_attempt_in": round(max(0.0, state.next_attempt_at - now), 3),
            }
            if token is not None:
                entry.update(
                    token_type=token.token_type,
                    issued_at=token.issued_at,
                    expires_at=token.expires_at,
                    expires_in=round(token.expires_at - now, 3),
                    usable_until=self.policy.usable_until(token),
                    claims=token.claims,
                )
            if state.last_error is not None:
                entry["last_error"] = {
                    "code": state.last_error.code,
                    "detail": state.last_error.detail,
                    "retryable": state.last_error.retryable,
                }
            out.append(entry)
        return out

    def _expiry_snapshot(self) -> list[tuple[str, float | None, bool]]:
        now = self._clock()
        return [
            (
                audience,
                None if slot.state.token is None else slot.state.token.expires_at - now,
                slot.state.usable(now) is not None,
            )
            for audience, slot in self._slots.items()
        ]

    # -- refreshing -----------------------------------------------------------------------

    def _slot(self, audience: str) -> _Slot:
        slot = self._slots.get(audience)
        if slot is None:
            if self._closed:
                raise NoValidToken(audience, "the token source is shut down")
            slot = self._slots[audience] = _Slot(AudienceState(audience, self.policy))
            slot.task = asyncio.get_running_loop().create_task(
                self._refresher(slot), name=f"token-refresher {audience}"
            )
        return slot

    async def _refresher(self, slot: _Slot) -> None:
        while True:
            slot.wake.clear()
            delay = slot.state.next_attempt_at - self._clock()
            if delay > 0:
                # Woken early when an on-demand fetch rescheduled; then recompute.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(slot.wake.wait(), delay)
                continue
            if slot.inflight is None:
                self._start_fetch(slot, "refresh")
            inflight = slot.inflight
            assert inflight is not None
            await asyncio.shield(inflight)
            await asyncio.sleep(0)  # let the done-callback clear ``inflight``

    def _start_fetch(self, slot: _Slot, trigger: str) -> None:
        task = asyncio.get_running_loop().create_task(
            self._fetch(slot, trigger), name=f"token-fetch {slot.state.audience}"
        )
        slot.inflight = task

        def done(_: asyncio.Task[None]) -> None:
            if slot.inflight is task:
                slot.inflight = None

        task.add_done_callback(done)

    async def _fetch(self, slot: _Slot, trigger: str) -> None:
        state = slot.state
        audience = state.audience
        state.on_attempt(self._clock())
        had_error = state.last_error is not None
        try:
            try:
                token = await asyncio.wait_for(
                    self.attestor.fetch(audience), self.policy.fetch_timeout
                )
            except TimeoutError:
                raise IdentityError(
                    IdentityCode.TIMEOUT, f"no token within {self.policy.fetch_timeout:g}s"
                ) from None
            except IdentityError:
                raise
            except Exception as exc:  # a bug in an attestor: keep refreshing, say so loudly
                log.exception("attestor %s raised unexpectedly", self.attestor.kind)
                raise IdentityError(IdentityCode.INTERNAL_ERROR, type(exc).__name__) from exc
        except IdentityError as err:
            now = self._clock()
            state.on_failure(err, now, self._draw())
            if self._metrics is not None:
                self._metrics.fetched(audience, trigger, err.code)
            self._failures_log.warning(
                audience,
                "token fetch failed audience=%s trigger=%s code=%s retryable=%s failures=%d "
                "next_in=%.2fs detail=%s",
                audience,
                trigger,
                err.code,
                err.retryable,
                state.failures,
                state.next_attempt_at - now,
                err.detail,
            )
        else:
            if had_error:
                self._failures_log.resolved(audience)
            now = self._clock()
            state.on_success(token, now, self._draw())
            if self._metrics is not None:
                self._metrics.fetched(audience, trigger, "ok")
            level = logging.INFO if had_error or state.fetches == 1 else logging.DEBUG
            log.log(
                level,
                "token fetched audience=%s type=%s expires_in=%.1fs refresh_in=%.1fs",
                audience,
                token.token_type,
                token.expires_at - now,
                state.next_attempt_at - now,
            )
        finally:
            slot.wake.set()
