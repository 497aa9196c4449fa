"""Session turnover on the in-memory transport: the standby supply and early release.

These tests check what happens, not how fast. A session that a worker keeps while it
waits out its idle timeout must not stop the supply from accepting the next one. The
worker must hand its empty session over to a waiting order well before the idle
timeout ends.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import CollectorRegistry

from consumer.app import ConsumerApp
from consumer.config import Settings
from consumer.metrics import ConsumerMetrics
from consumer.processor import PEEK_AHEAD
from consumer.testing import make_event
from consumer.transport.memory import (
    MemoryBroker,
    MemorySessionReceiver,
    MemoryTransport,
)
from consumer.transport.supply import EMPTY_ENTITY_PROBES, SessionSupply

ENTITY = "orders.turnover.events"
# Far longer than any wait in these tests, so only an early release can explain a
# second order being handled while the first session is still within its timeout.
LONG_IDLE_S = 60.0


def _settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "connection_string": "Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=k;"
        "SharedAccessKey=unused",
        "entity": ENTITY,
        "accept_timeout_s": 0.05,
        "metrics_port": 0,
        **overrides,
    }
    return Settings(**values)


async def _send(broker: MemoryBroker, order_id: str, count: int = 1) -> None:
    for index in range(count):
        event = make_event("ORDER_UPDATED", order_id)
        await broker.send(
            json.dumps(event).encode(),
            session_id=order_id,
            message_id=f"{order_id}-{index}",
            subject=event["eventType"],
        )


async def _wait_until(predicate: Any, timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


class CountingTransport(MemoryTransport):
    """A memory transport that counts the peeks of the receivers it hands out."""

    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__(broker)
        self.peeks = 0

    async def accept_session(self, max_wait_s: float) -> MemorySessionReceiver | None:
        receiver = await super().accept_session(max_wait_s)
        if receiver is None:
            return None
        transport = self
        peek = receiver.peek_sequence_numbers

        async def counted(from_sequence_number: int, max_count: int) -> list[int]:
            transport.peeks += 1
            return await peek(from_sequence_number, max_count)

        receiver.peek_sequence_numbers = counted  # type: ignore[method-assign]
        return receiver


async def test_supply_keeps_standby_sessions_while_workers_hold_theirs() -> None:
    broker = MemoryBroker(ENTITY)
    for index in range(6):
        await _send(broker, f"order-{index}")
    supply = SessionSupply(
        MemoryTransport(broker),
        held=2,
        standby=1,
        accept_timeout_s=0.05,
        metrics=ConsumerMetrics(CollectorRegistry()),
    )
    supply.start()
    try:
        held = [await supply.take(), await supply.take()]
        # Both workers keep their sessions, and one more is accepted for the next
        # free worker, but not two: the locks stay within held + standby.
        await _wait_until(supply.has_waiting)
        await asyncio.sleep(0.2)
        locked = [s for s in broker.sessions.values() if s.locked]
        assert len(locked) == 3
        assert {receiver.session_id for receiver in held} < {
            session_id for session_id, s in broker.sessions.items() if s.locked
        }
    finally:
        await supply.stop(time.monotonic() + 1, time.monotonic() + 5)
        for receiver in held:
            await receiver.close()


@asynccontextmanager
async def _one_worker_app(transport: MemoryTransport) -> AsyncIterator[list[str]]:
    """Run an app with one worker and a long idle timeout, and yield the order ids of
    the events it handles, in handling order."""
    handled: list[str] = []

    async def record(event: Any, ctx: Any) -> None:
        handled.append(ctx.order_id)

    settings = _settings(
        max_concurrent_sessions=1,
        standby_sessions=1,
        session_idle_timeout_s=LONG_IDLE_S,
    )
    app = ConsumerApp(settings, transport=transport)
    app.router.add_handler("ORDER_UPDATED", record)
    run = asyncio.create_task(app.run())
    try:
        yield handled
    finally:
        app.stop()
        await asyncio.wait_for(run, timeout=30)


async def test_idle_session_released_for_later_order() -> None:
    broker = MemoryBroker(ENTITY)
    await _send(broker, "order-first")
    async with _one_worker_app(MemoryTransport(broker)) as handled:
        await _wait_until(lambda: handled == ["order-first"])
        # The only worker now waits on an empty session with a long idle timeout.
        await _send(broker, "order-second")
        await _wait_until(lambda: "order-second" in handled)
    assert handled == ["order-first", "order-second"]


async def test_worker_peeks_once_per_batch_of_queued_messages() -> None:
    broker = MemoryBroker(ENTITY)
    messages = PEEK_AHEAD + 8
    await _send(broker, "order-long", messages)
    await _send(broker, "order-waiting")
    transport = CountingTransport(broker)
    async with _one_worker_app(transport) as handled:
        await _wait_until(lambda: len(handled) == messages + 1)
    # The long order runs first and whole, because its session has messages left.
    assert handled[:messages] == ["order-long"] * messages
    # One peek per PEEK_AHEAD messages plus the one that finds the session empty,
    # where a peek per message would make 40.
    assert transport.peeks <= messages // PEEK_AHEAD + 2


class AcceptCountingTransport(MemoryTransport):
    """A memory transport that records the most accepts it had in flight at once."""

    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__(broker)
        self.in_flight = 0
        self.max_in_flight = 0

    async def accept_session(self, max_wait_s: float) -> MemorySessionReceiver | None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await super().accept_session(max_wait_s)
        finally:
            self.in_flight -= 1


async def test_empty_entity_keeps_two_accepts_in_flight() -> None:
    broker = MemoryBroker(ENTITY)
    transport = AcceptCountingTransport(broker)
    supply = SessionSupply(
        transport,
        held=4,
        standby=8,
        accept_timeout_s=0.05,
        metrics=ConsumerMetrics(CollectorRegistry()),
    )
    supply.start()
    try:
        # The first round starts every accept the standby count allows. Once they
        # come back empty, only the probes keep going.
        await _wait_until(lambda: supply.empty_since is not None)
        await asyncio.sleep(0.3)
        transport.max_in_flight = transport.in_flight
        await asyncio.sleep(0.5)
        assert transport.max_in_flight <= EMPTY_ENTITY_PROBES

        # A session that arrives is still found, and then every accept resumes.
        await _send(broker, "order-late")
        taken = await asyncio.wait_for(supply.take(), timeout=10)
        assert taken.session_id == "order-late"
        await taken.close()
    finally:
        await supply.stop(time.monotonic() + 1, time.monotonic() + 5)
