"""`unless_set` and `CallbackEvent`: waits that an event cuts short."""

from __future__ import annotations

import asyncio

import pytest

from consumer.held_session import CallbackEvent, unless_set


class Operation:
    """A coroutine source that waits on `release` and records how it ended."""

    def __init__(self, *, swallow_cancel: bool = False) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.swallow_cancel = swallow_cancel
        self.cancelled = False

    async def run(self) -> str:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            if not self.swallow_cancel:
                raise
            return "swallowed"
        return "done"


async def test_result_when_no_event_set() -> None:
    operation = Operation()
    operation.release.set()

    finished, result = await unless_set(operation.run(), asyncio.Event())

    assert finished is True
    assert result == "done"


@pytest.mark.parametrize("event_class", [asyncio.Event, CallbackEvent])
async def test_event_set_cancels_operation(event_class: type[asyncio.Event]) -> None:
    operation = Operation()
    stop = event_class()
    waiting = asyncio.create_task(unless_set(operation.run(), stop))
    await operation.started.wait()

    stop.set()
    finished, result = await waiting

    assert finished is False
    assert result is None
    assert operation.cancelled is True
    assert waiting.cancelling() == 0


async def test_event_set_before_start_skips_operation() -> None:
    operation = Operation()
    stop = CallbackEvent()
    stop.set()

    finished, result = await unless_set(operation.run(), stop)

    assert finished is False
    assert result is None
    assert not operation.started.is_set()


async def test_outside_cancel_propagates() -> None:
    operation = Operation()
    waiting = asyncio.create_task(unless_set(operation.run(), CallbackEvent()))
    await operation.started.wait()

    waiting.cancel()

    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert operation.cancelled is True


async def test_outside_cancel_wins_over_event() -> None:
    operation = Operation()
    stop = CallbackEvent()
    waiting = asyncio.create_task(unless_set(operation.run(), stop))
    await operation.started.wait()

    stop.set()
    waiting.cancel()

    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_swallowed_cancel_keeps_result() -> None:
    operation = Operation(swallow_cancel=True)
    stop = CallbackEvent()

    async def wait_then_sleep() -> tuple[bool, str | None]:
        outcome = await unless_set(operation.run(), stop)
        # A cancel request left behind would raise here.
        await asyncio.sleep(0)
        return outcome

    waiting = asyncio.create_task(wait_then_sleep())
    await operation.started.wait()

    stop.set()
    finished, result = await waiting

    assert finished is True
    assert result == "swallowed"


async def test_callbacks_run_once_until_removed() -> None:
    event = CallbackEvent()
    calls: list[str] = []

    def kept() -> None:
        calls.append("kept")

    def removed() -> None:
        calls.append("removed")

    event.add_callback(kept)
    event.add_callback(removed)
    event.remove_callback(removed)
    event.remove_callback(removed)
    event.set()
    event.set()

    assert calls == ["kept"]
    assert event.is_set()
    assert await asyncio.wait_for(event.wait(), timeout=1.0) is True
