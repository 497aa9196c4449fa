"""Lock renewal stops when the session is handed on, even if its cancel is lost.

azure-servicebus 7.15.0 awaits `asyncio.wait_for`, which on Python 3.11 drops a
cancellation that arrives as the awaited call finishes. A chaos run found the effect:
a standby session's keeper missed its cancel, renewed the session for as long as the
consumer ran, and the worker taking it waited on the keeper for good. The order's
later messages stayed in the queue. `SwallowingReceiver` reproduces that drop on
purpose: a cancel that reaches its renewal is swallowed once.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from consumer.metrics import ConsumerMetrics
from consumer.testing import make_event
from consumer.transport import SessionReceiver
from consumer.transport.memory import MemoryBroker, MemoryTransport
from consumer.transport.renewal import renew_session_lock
from consumer.transport.supply import SessionSupply

ENTITY = "orders.renewal.events"
LOCK_S = 1.0
RENEW_TAKES_S = 0.2


class SwallowingReceiver:
    """A session receiver with a short lock whose renewal swallows one cancel."""

    def __init__(self, inner: SessionReceiver) -> None:
        self._inner = inner
        self._locked_until = datetime.now(UTC) + timedelta(seconds=LOCK_S)
        self.renewals = 0
        self.swallowed = 0
        self.renewing = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    @property
    def locked_until(self) -> datetime:
        return self._locked_until

    async def renew_lock(self) -> datetime:
        self.renewals += 1
        self.renewing.set()
        try:
            await asyncio.sleep(RENEW_TAKES_S)
        except asyncio.CancelledError:
            # What `asyncio.wait_for` does when its inner call has just finished.
            self.swallowed += 1
        self._locked_until = datetime.now(UTC) + timedelta(seconds=LOCK_S)
        return self._locked_until


class SwallowingTransport(MemoryTransport):
    """Hands out `SwallowingReceiver`s and keeps them for the test to inspect."""

    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__(broker)
        self.receivers: list[SwallowingReceiver] = []

    async def accept_session(self, max_wait_s: float) -> SwallowingReceiver | None:  # type: ignore[override]
        inner = await super().accept_session(max_wait_s)
        if inner is None:
            return None
        receiver = SwallowingReceiver(inner)
        self.receivers.append(receiver)
        return receiver


async def _renewals_after(receiver: SwallowingReceiver, wait_s: float) -> int:
    before = receiver.renewals
    await asyncio.sleep(wait_s)
    return receiver.renewals - before


async def test_take_ends_keeper_that_missed_cancel() -> None:
    broker = MemoryBroker(ENTITY)
    event = make_event("ORDER_UPDATED", "ORD-1")
    await broker.send(json.dumps(event).encode(), session_id="ORD-1", message_id="m1")
    transport = SwallowingTransport(broker)
    supply = SessionSupply(
        transport,
        held=1,
        standby=1,
        accept_timeout_s=0.05,
        metrics=ConsumerMetrics(CollectorRegistry()),
    )
    supply.start()
    try:
        async with asyncio.timeout(10):
            while not transport.receivers:
                await asyncio.sleep(0.01)
            waiting = transport.receivers[0]
            # Take the session while its keeper is inside a renewal, so the take's
            # cancel reaches the renewal and is swallowed.
            await waiting.renewing.wait()
            handed_over = await supply.take()
        assert handed_over is waiting
        assert waiting.swallowed == 1
        # The keeper renews every LOCK_S / 2 while it runs, so two locks' time
        # without a renewal shows that it ended.
        assert await _renewals_after(waiting, 2 * LOCK_S) == 0
    finally:
        await supply.stop(time.monotonic() + 1, time.monotonic() + 5)


async def test_renewal_ends_on_release_despite_lost_cancel() -> None:
    broker = MemoryBroker(ENTITY)
    event = make_event("ORDER_UPDATED", "ORD-2")
    await broker.send(json.dumps(event).encode(), session_id="ORD-2", message_id="m2")
    inner = await MemoryTransport(broker).accept_session(1.0)
    assert inner is not None
    receiver = SwallowingReceiver(inner)
    released = asyncio.Event()
    renewer = asyncio.create_task(
        renew_session_lock(
            receiver,
            max_lock_renewal_s=60.0,
            busy_since=lambda: None,
            on_renewed=lambda: None,
            on_failed=lambda error: None,
            lock_lost=asyncio.Event(),
            released=released,
        )
    )
    try:
        async with asyncio.timeout(10):
            await receiver.renewing.wait()
        released.set()
        renewer.cancel()
        assert await _renewals_after(receiver, 2 * LOCK_S) == 0
        assert receiver.swallowed == 1
        assert renewer.done()
    finally:
        renewer.cancel()
        await asyncio.gather(renewer, return_exceptions=True)
        await inner.close()
