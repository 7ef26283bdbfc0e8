"""Running a service: uvloop, the one lifecycle (:func:`serve`), signal handling, the admin
listener, the ready line tests wait for."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.listen_address import ListenAddress, bind_unix
from sidecar.net_limits import (
    ADMIN_LIMITS,
    ConnLimits,
    GuardedSite,
    ListenerGuard,
    server_options,
)
from sidecar.observability.logs import plain_event


def freeze_startup_heap() -> None:
    """Move what start-up built (modules, keys, policy, descriptors, config) out of the cyclic
    collector's sight: it never becomes garbage, and without this every full collection walks
    it again under load (measured on the egress proxy: one ~95 ms pass in a 5 s run)."""
    gc.collect()
    gc.freeze()


def install_uvloop() -> None:
    if os.environ.get("SIDECAR_EVENT_LOOP") == "asyncio":  # for comparisons in benchmarks
        return
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


log = logging.getLogger(__name__)

T = TypeVar("T")
Step = Callable[[], Coroutine[Any, Any, Any]]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def wait_for_stop_signal() -> None:
    """SIGTERM or SIGINT (the benchmarks' trivial servers; commands use :func:`serve`)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def start_admin_site(
    app: web.Application,
    host: str,
    port: int,
    registry: CollectorRegistry,
    limits: ConnLimits = ADMIN_LIMITS,
) -> tuple[web.AppRunner, int]:
    """The admin listener (``/healthz``, ``/readyz``, ``/metrics``), with the admin limits."""
    runner, bound = await start_admin_at(app, ListenAddress(host, port), registry, limits)
    return runner, bound.port


async def start_admin_at(
    app: web.Application,
    address: ListenAddress,
    registry: CollectorRegistry,
    limits: ConnLimits = ADMIN_LIMITS,
) -> tuple[web.AppRunner, ListenAddress]:
    """:func:`start_admin_site` on any address (a worker's admin is a unix socket)."""
    runner = _admin_runner(app, limits)
    await runner.setup()
    guard = ListenerGuard("admin", limits, registry)
    return runner, await start_listener_site(runner, address, guard)


def _admin_runner(app: web.Application, limits: ConnLimits) -> web.AppRunner:
    return web.AppRunner(app, access_log=None, handle_signals=False, **server_options(limits))


async def start_listener_site(
    runner: web.AppRunner, address: ListenAddress, guard: ListenerGuard, backlog: int = 1024
) -> ListenAddress:
    """Bind ``runner`` (already set up, with :func:`server_options` of ``guard.limits``) to a
    TCP address or a 0600 unix socket, its connections kept by ``guard``; returns the address
    bound (the real port when 0 was asked for)."""
    if address.path is not None:
        sock = bind_unix(address.path, backlog)
        await GuardedSite(runner, guard, sock, backlog=backlog).start()
        return address
    await GuardedSite(runner, guard, (address.host, address.port), backlog=backlog).start()
    # One site per runner here: its TCP address carries the real port.
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    return ListenAddress(address.host, int(port))


def announce(name: str, **ports: Any) -> None:
    """The single line tests and the demo wait for: every listener, with its real port."""
    fields = {k: v for k, v in ports.items() if v is not None}
    # Printed, not logged: it must show whatever --log-level says; in the --log-format.
    print(plain_event(f"{name} ready", fields), file=sys.stderr, flush=True)


class Lifecycle:
    """What :func:`serve` hands to a command's ``setup``. Every component is started through
    :meth:`start`, so whatever happens next (a later component failing to start, a signal, a
    crashed background task) the ones started are stopped, in reverse order."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self._stack = stack
        self._stopping = asyncio.Event()
        self._reload_wanted = asyncio.Event()
        self._reload: Step | None = None
        self._background: list[Step] = []

    async def start(self, start: Callable[[], Awaitable[T]], stop: Step) -> T:
        """``await start()``, with ``stop`` registered first: a component whose start fails
        half-way (one listener bound, the next refused) is stopped too, so ``stop`` must
        accept a partial start."""
        self._stack.push_async_callback(stop)
        return await start()

    async def start_admin(
        self,
        app: web.Application,
        address: ListenAddress,
        registry: CollectorRegistry,
        limits: ConnLimits = ADMIN_LIMITS,
    ) -> ListenAddress:
        """The admin listener as a component (:func:`start_admin_at`); the address bound."""
        runner = _admin_runner(app, limits)
        await self.start(runner.setup, runner.cleanup)
        guard = ListenerGuard("admin", limits, registry)
        return await start_listener_site(runner, address, guard)

    def on_stop(self, stop: Step) -> None:
        """Run ``stop`` at the end (in reverse order with the components)."""
        self._stack.push_async_callback(stop)

    def on_reload(self, hook: Step) -> None:
        """What SIGHUP (or :meth:`request_reload`) runs once serving; one at a time."""
        self._reload = hook

    def background(self, task: Step) -> None:
        """A task that runs while serving (a config file watch); if it fails, the service
        stops (and the failure is raised)."""
        self._background.append(task)

    def request_reload(self) -> None:
        """Ask for a reload; requests made while one runs (or while starting) are merged
        into one more run afterwards."""
        self._reload_wanted.set()

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def _reloads(self) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            if self._reload is None:
                log.warning("reload asked for, but this process has nothing to reload")
                continue
            try:
                await self._reload()
            except Exception:  # a bug in a hook: keep serving with what runs
                log.exception("reload failed; the running configuration is kept")

    async def _serve(self, until: Step | None) -> None:
        try:
            await self._serve_tasks(until)
        except BaseExceptionGroup as group:  # one crashed task: raise it, not the group
            raise group.exceptions[0] from None

    async def _serve_tasks(self, until: Step | None) -> None:
        async with asyncio.TaskGroup() as tasks:
            running = [tasks.create_task(self._reloads())]
            running += [tasks.create_task(step()) for step in self._background]
            if until is not None:
                running.append(tasks.create_task(_then(until, self.stop)))
            await self._stopping.wait()
            for task in running:
                task.cancel()


def as_async(start: Callable[[], None]) -> Step:
    """A synchronous start (a watch that only schedules a task) for :meth:`Lifecycle.start`."""

    async def started() -> None:
        start()

    return started


async def _then(first: Step, then: Callable[[], None]) -> None:
    await first()
    then()


async def serve(
    setup: Callable[[Lifecycle], Awaitable[None]],
    *,
    stop_signals: Sequence[signal.Signals] = STOP_SIGNALS,
    reload_signal: bool = True,
    until: Step | None = None,
) -> None:
    """The one lifecycle of a long-running command. ``setup`` starts the components in order
    through the :class:`Lifecycle` (and announces the ready line); then the process serves
    until one of ``stop_signals`` (SIGTERM/SIGINT: a graceful drain, each component's ``stop``
    in reverse order) or until ``until`` returns. SIGHUP runs the reload hook instead of
    killing the process. A signal during start-up cancels the start and stops what started."""
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        lifecycle = Lifecycle(stack)
        handled = [*stop_signals, *([signal.SIGHUP] if reload_signal else [])]
        for sig in stop_signals:
            loop.add_signal_handler(sig, _on_stop_signal, lifecycle, sig)
        if reload_signal:
            loop.add_signal_handler(signal.SIGHUP, lifecycle.request_reload)
        for sig in handled:  # removed last: a signal while stopping changes nothing
            stack.callback(loop.remove_signal_handler, sig)
        starting = asyncio.ensure_future(setup(lifecycle))
        stopped = asyncio.ensure_future(lifecycle._stopping.wait())
        try:
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
        if starting.cancelled():
            return  # stopped while starting; the stack stops what did start
        starting.result()  # a start-up failure: raised once the stack has stopped the rest
        await lifecycle._serve(until)


def _on_stop_signal(lifecycle: Lifecycle, sig: signal.Signals) -> None:
    log.info("%s: stopping", sig.name)
    lifecycle.stop()


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    install_uvloop()
    asyncio.run(main())
