"""``runtime.serve``: components start in order and stop in reverse, whatever ends the run (a
later start-up failure, a stop signal, a crashed background task); SIGHUP runs the reload hook
instead of killing the process."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from sidecar.runtime import Lifecycle, serve


class Fake:
    def __init__(self, name: str, events: list[str], fail: bool = False) -> None:
        self.name, self.events, self.fail = name, events, fail

    async def start(self) -> str:
        self.events.append(f"start {self.name}")
        if self.fail:
            raise OSError(f"{self.name}: address already in use")
        return self.name

    async def stop(self) -> None:
        self.events.append(f"stop {self.name}")


def test_a_start_up_failure_after_the_first_component_stops_the_first() -> None:
    events: list[str] = []

    async def setup(lifecycle: Lifecycle) -> None:
        for fake in (Fake("fds", events), Fake("service", events), Fake("admin", events, True)):
            await lifecycle.start(fake.start, fake.stop)
        events.append("serving")  # never reached

    with pytest.raises(OSError, match="admin: address already in use"):
        asyncio.run(serve(setup, reload_signal=False))
    # The failed one is stopped too (its stop must accept a partial start), then the rest.
    assert events == [
        "start fds",
        "start service",
        "start admin",
        "stop admin",
        "stop service",
        "stop fds",
    ]


def test_components_stop_in_reverse_when_serving_ends() -> None:
    events: list[str] = []

    async def scenario() -> None:
        finish = asyncio.Event()

        async def setup(lifecycle: Lifecycle) -> None:
            assert await lifecycle.start(Fake("a", events).start, Fake("a", events).stop) == "a"
            await lifecycle.start(Fake("b", events).start, Fake("b", events).stop)
            asyncio.get_running_loop().call_later(0.05, finish.set)

        await serve(setup, reload_signal=False, until=finish.wait)

    asyncio.run(scenario())
    assert events == ["start a", "start b", "stop b", "stop a"]


def test_sigterm_stops_gracefully_and_sighup_reloads_without_stopping() -> None:
    events: list[str] = []

    async def scenario() -> None:
        async def setup(lifecycle: Lifecycle) -> None:
            fake = Fake("service", events)
            await lifecycle.start(fake.start, fake.stop)
            reloads = 0

            async def reload() -> None:
                nonlocal reloads
                reloads += 1
                events.append(f"reload {reloads}")
                if reloads == 1:
                    raise RuntimeError("a bug in the hook does not stop the service")
                os.kill(os.getpid(), signal.SIGTERM)

            lifecycle.on_reload(reload)
            loop = asyncio.get_running_loop()
            loop.call_later(0.05, os.kill, os.getpid(), signal.SIGHUP)
            loop.call_later(0.2, os.kill, os.getpid(), signal.SIGHUP)

        await serve(setup)

    asyncio.run(scenario())
    assert events == ["start service", "reload 1", "reload 2", "stop service"]


def test_sighup_while_starting_is_applied_once_started() -> None:
    events: list[str] = []

    async def scenario() -> None:
        async def setup(lifecycle: Lifecycle) -> None:
            os.kill(os.getpid(), signal.SIGHUP)
            os.kill(os.getpid(), signal.SIGHUP)  # merged with the first
            await asyncio.sleep(0.05)
            events.append("started")

            async def reload() -> None:
                events.append("reload")
                lifecycle.stop()

            lifecycle.on_reload(reload)

        await serve(setup)

    asyncio.run(scenario())
    assert events == ["started", "reload"]


def test_a_stop_signal_during_start_up_cancels_it_and_stops_what_started() -> None:
    events: list[str] = []

    async def scenario() -> None:
        async def setup(lifecycle: Lifecycle) -> None:
            await lifecycle.start(Fake("a", events).start, Fake("a", events).stop)
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(30)  # a slow start: cancelled by the signal
            events.append("never")

        await asyncio.wait_for(serve(setup, reload_signal=False), 10)

    asyncio.run(scenario())
    assert events == ["start a", "stop a"]


def test_a_crashed_background_task_stops_the_service_and_is_raised() -> None:
    events: list[str] = []

    async def crash() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("watch failed")

    async def setup(lifecycle: Lifecycle) -> None:
        await lifecycle.start(Fake("a", events).start, Fake("a", events).stop)
        lifecycle.background(crash)

    with pytest.raises(ValueError, match="watch failed"):
        asyncio.run(asyncio.wait_for(serve(setup, reload_signal=False), 10))
    assert events == ["start a", "stop a"]
