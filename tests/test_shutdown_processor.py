"""Stopping the processor at many different moments, on the in-memory transport.

A stop can land while sessions are being accepted, handed over, worked or released,
and while the idle watcher stops the processor by itself. Each run must end cleanly,
leave no session locked and complete every message at most once.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import pytest
from structlog.testing import capture_logs

from consumer.app import ConsumerApp
from consumer.config import Settings, local_connection_string
from consumer.events import EVENT_TYPES
from consumer.generate import generate_stream
from consumer.processor import SESSION_CLOSE_MARGIN_S
from consumer.routing import EventContext
from consumer.transport import SessionReceiver
from consumer.transport.memory import MemoryBroker, MemoryTransport

ENTITY = "orders.memory.events"
# Loop iterations and short sleeps before the stop: the first ones land in start-up
# (acceptors and workers starting), later ones while messages are handled.
STOP_AFTER_ITERATIONS = list(range(0, 40, 3))
STOP_AFTER_S = [0.001, 0.004, 0.01, 0.02, 0.04, 0.07, 0.1]


def memory_settings(**overrides: Any) -> Settings:
    """Return settings with short timeouts so that a run ends in milliseconds."""
    values: dict[str, Any] = {
        "connection_string": local_connection_string(),
        "entity": ENTITY,
        "max_concurrent_sessions": 2,
        "standby_sessions": 2,
        "session_idle_timeout_s": 0.01,
        "accept_timeout_s": 0.02,
        "shutdown_grace_s": 5.0,
        "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(**values)


async def filled_broker(orders: int, seed: int) -> tuple[MemoryBroker, list[str]]:
    """Return a memory broker holding a generated stream, and its message ids."""
    broker = MemoryBroker(ENTITY)
    message_ids = []
    for index, event in enumerate(generate_stream(orders, seed=seed)):
        message_id = f"m{index}"
        await broker.send(
            json.dumps(event).encode(),
            session_id=event["payload"]["orderId"],
            message_id=message_id,
            subject=event["eventType"],
        )
        message_ids.append(message_id)
    return broker, message_ids


class CountingHandler:
    """A handler that counts its calls that returned, per message id."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.returned: Counter[str] = Counter()

    async def __call__(self, event: Any, ctx: EventContext) -> None:
        await asyncio.sleep(self.delay_s)
        self.returned[ctx.message_id] += 1


def new_app(
    broker: MemoryBroker, handler: CountingHandler, **overrides: Any
) -> ConsumerApp:
    app = ConsumerApp(memory_settings(**overrides), transport=MemoryTransport(broker))
    for event_type in EVENT_TYPES:
        app.router.add_handler(event_type, handler)
    return app


def left_in_broker(broker: MemoryBroker) -> list[str]:
    """Return the ids of the messages still pending or deferred in `broker`."""
    left = []
    for session in broker.sessions.values():
        left += [message.message_id for message in session.pending]
        left += [message.message_id for message in session.deferred.values()]
    return left


def assert_clean_stop(
    broker: MemoryBroker, message_ids: list[str], logs: list[dict[str, Any]]
) -> None:
    """Check one stopped run: no failure, no lock left, no message lost or doubled."""
    failures = [entry for entry in logs if entry["event"] == "processor_task_failed"]
    completed = [message.message_id for message in broker.completed]
    left = left_in_broker(broker)
    assert failures == []
    assert [name for name, session in broker.sessions.items() if session.locked] == []
    assert broker.dead_letters == []
    assert len(completed) == len(set(completed))
    assert set(completed).isdisjoint(left)
    assert sorted(completed + left) == sorted(message_ids)


async def run_and_stop(app: ConsumerApp, stop_after: int | float) -> None:
    """Run `app`, call `stop()` after `stop_after` loop iterations or seconds."""
    running = asyncio.create_task(app.run())
    if isinstance(stop_after, int):
        for _ in range(stop_after):
            await asyncio.sleep(0)
    else:
        await asyncio.sleep(stop_after)
    app.stop()
    await asyncio.wait_for(running, timeout=30)


@pytest.mark.parametrize("stop_after", STOP_AFTER_ITERATIONS + STOP_AFTER_S)
async def test_stop_at_any_moment_is_clean(stop_after: int | float) -> None:
    broker, message_ids = await filled_broker(orders=6, seed=5)
    handler = CountingHandler(delay_s=0.002)
    app = new_app(broker, handler)

    with capture_logs() as logs:
        await run_and_stop(app, stop_after)

    assert_clean_stop(broker, message_ids, logs)
    # The grace period is long enough for every handler call in flight.
    completed = [message.message_id for message in broker.completed]
    assert Counter(completed) == handler.returned


@pytest.mark.parametrize("stop_after", STOP_AFTER_ITERATIONS + STOP_AFTER_S)
async def test_stop_without_grace_is_clean(stop_after: int | float) -> None:
    broker, message_ids = await filled_broker(orders=6, seed=6)
    handler = CountingHandler(delay_s=0.002)
    app = new_app(broker, handler, shutdown_grace_s=0.0)

    with capture_logs() as logs:
        await run_and_stop(app, stop_after)

    assert_clean_stop(broker, message_ids, logs)


@pytest.mark.parametrize("until_idle_s", [0.0, 0.01, 0.02, 0.05, 0.1])
@pytest.mark.parametrize("accept_timeout_s", [0.005, 0.02, 0.1])
async def test_idle_stop_is_clean(until_idle_s: float, accept_timeout_s: float) -> None:
    broker, message_ids = await filled_broker(orders=3, seed=2)
    handler = CountingHandler()
    app = new_app(broker, handler, accept_timeout_s=accept_timeout_s)

    with capture_logs() as logs:
        await asyncio.wait_for(app.run(until_idle_s=until_idle_s), timeout=30)

    assert_clean_stop(broker, message_ids, logs)
    assert left_in_broker(broker) == []


async def test_stop_before_run_is_clean() -> None:
    broker, message_ids = await filled_broker(orders=2, seed=1)
    handler = CountingHandler()
    app = new_app(broker, handler)

    app.stop()
    with capture_logs() as logs:
        await asyncio.wait_for(app.run(), timeout=30)

    assert_clean_stop(broker, message_ids, logs)


async def test_stop_from_handler_is_clean() -> None:
    broker, message_ids = await filled_broker(orders=4, seed=3)
    handler = CountingHandler()
    app = new_app(broker, handler)

    async def stop_on_third(event: Any, ctx: EventContext) -> None:
        if sum(handler.returned.values()) >= 3:
            app.stop()

    for event_type in EVENT_TYPES:
        app.router.add_handler(event_type, stop_on_third)
    with capture_logs() as logs:
        await asyncio.wait_for(app.run(), timeout=30)

    assert_clean_stop(broker, message_ids, logs)


class StubbornHandler:
    """A handler that ignores the first cancellation and waits on."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, event: Any, ctx: EventContext) -> None:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            await self.release.wait()


async def test_stop_leaves_stuck_handler_behind() -> None:
    broker, _ = await filled_broker(orders=1, seed=1)
    handler = StubbornHandler()
    app = ConsumerApp(
        memory_settings(shutdown_grace_s=0.0), transport=MemoryTransport(broker)
    )
    for event_type in EVENT_TYPES:
        app.router.add_handler(event_type, handler)

    with capture_logs() as logs:
        running = asyncio.create_task(app.run())
        await asyncio.wait_for(handler.started.wait(), timeout=30)
        app.stop()
        # run() returns after the close margin, although the handler never returns.
        await asyncio.wait_for(running, timeout=30 + SESSION_CLOSE_MARGIN_S)
    handler.release.set()

    [left] = [entry for entry in logs if entry["event"] == "shutdown_closes_abandoned"]
    assert left["workers"] == 1
    assert broker.completed == []


class StubbornAcceptTransport(MemoryTransport):
    """A memory transport whose accepts wait for `release` once cancelled.

    This is how an SDK accept behaves that runs its link cleanup before it ends.
    """

    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__(broker)
        self.waiting = asyncio.Event()
        self.release = asyncio.Event()

    async def accept_session(self, max_wait_s: float) -> SessionReceiver | None:
        """Wait until cancelled, then for `release`; never accept a session."""
        self.waiting.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await self.release.wait()
            raise
        return None


async def test_stop_leaves_stuck_accept_behind() -> None:
    transport = StubbornAcceptTransport(MemoryBroker(ENTITY))
    app = ConsumerApp(memory_settings(shutdown_grace_s=0.0), transport=transport)

    with capture_logs() as logs:
        running = asyncio.create_task(app.run())
        await asyncio.wait_for(transport.waiting.wait(), timeout=30)
        app.stop()
        await asyncio.wait_for(running, timeout=30 + SESSION_CLOSE_MARGIN_S)
    transport.release.set()

    [left] = [entry for entry in logs if entry["event"] == "supply_stop_timed_out"]
    capacity = app.settings.max_concurrent_sessions + app.settings.standby_sessions
    failures = [entry for entry in logs if entry["event"] == "processor_task_failed"]
    assert left["accepts"] == capacity
    assert failures == []
