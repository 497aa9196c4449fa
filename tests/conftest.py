"""Shared test helpers: a local broker per test, a publisher and a handler recorder.

Integration tests run the real `ConsumerApp` and Azure SDK against the local broker on
127.0.0.1, with short idle and accept timeouts so that a run ends soon after its last
message.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from azure.servicebus import ServiceBusMessage, ServiceBusSubQueue
from azure.servicebus.aio import ServiceBusClient

from consumer.app import ConsumerApp
from consumer.config import Settings
from consumer.events import EVENT_TYPES
from consumer.routing import EventContext
from consumer.transport import InboundMessage, SessionReceiver, Transport

# NOTE: after runs with many sessions, a few sockets and asyncio stream writers of
# azure-servicebus 7.15.0 connections are garbage-collected after the test's event loop
# closed, which pytest reports as unraisable ResourceWarnings in a later test. The
# consumer closes every receiver and the client, so the broker integration tests ignore
# only that warning class.
SDK_SOCKET_LEAKS = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)
QUEUE = "orders.test.events"
LOCK_DURATION_S = 5.0
MAX_DELIVERY_COUNT = 5


@dataclass(frozen=True)
class Outgoing:
    """A message to publish: a raw body and the properties a producer sets."""

    body: bytes
    session_id: str
    message_id: str
    subject: str | None = None


def outgoing_event(event: dict[str, Any], message_id: str) -> Outgoing:
    """Return the message a producer sends for `event`: session id = payload.orderId."""
    return Outgoing(
        body=json.dumps(event).encode("utf-8"),
        session_id=event["payload"]["orderId"],
        message_id=message_id,
        subject=event["eventType"],
    )


def numbered(events: list[dict[str, Any]]) -> list[Outgoing]:
    """Return the messages of `events`, message id `m<position in the stream>`."""
    return [outgoing_event(event, f"m{index}") for index, event in enumerate(events)]


async def publish(connection_string: str, messages: list[Outgoing]) -> None:
    """Send `messages` to `QUEUE` in batches, in list order."""
    async with ServiceBusClient.from_connection_string(connection_string) as client:
        async with client.get_queue_sender(QUEUE) as sender:
            batch = await sender.create_message_batch()
            for item in messages:
                message = ServiceBusMessage(
                    item.body,
                    session_id=item.session_id,
                    message_id=item.message_id,
                    subject=item.subject,
                    content_type="application/json",
                )
                try:
                    batch.add_message(message)
                except ValueError:
                    await sender.send_messages(batch)
                    batch = await sender.create_message_batch()
                    batch.add_message(message)
            if len(batch):
                await sender.send_messages(batch)


async def dead_letters(connection_string: str) -> list[dict[str, Any]]:
    """Receive and complete every message in the queue's dead-letter queue."""
    found: list[dict[str, Any]] = []
    async with ServiceBusClient.from_connection_string(connection_string) as client:
        receiver = client.get_queue_receiver(
            QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=1.0
        )
        async with receiver:
            while batch := await receiver.receive_messages(20, max_wait_time=1.0):
                for message in batch:
                    found.append(
                        {
                            "message_id": message.message_id,
                            "session_id": message.session_id,
                            "reason": message.dead_letter_reason,
                            "description": message.dead_letter_error_description,
                        }
                    )
                    await receiver.complete_message(message)
    return found


@dataclass
class Recorder:
    """Records every handler call and checks that no order runs two at once."""

    delay_s: float = 0.0
    handled: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    calls: int = 0
    in_flight: set[str] = field(default_factory=set)
    max_in_flight: int = 0
    overlaps: list[str] = field(default_factory=list)
    first_started_at: float | None = None
    last_finished_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def busy_s(self) -> float:
        """Seconds from the first handler call's start to the last one's end."""
        if self.first_started_at is None:
            return 0.0
        return self.last_finished_at - self.first_started_at

    async def __call__(self, event: Any, ctx: EventContext) -> None:
        self._enter(ctx)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        finally:
            self._leave(ctx)

    def _enter(self, ctx: EventContext) -> None:
        with self.lock:
            if self.first_started_at is None:
                self.first_started_at = time.monotonic()
            if ctx.order_id in self.in_flight:
                self.overlaps.append(ctx.order_id)
            self.in_flight.add(ctx.order_id)
            self.max_in_flight = max(self.max_in_flight, len(self.in_flight))

    def _leave(self, ctx: EventContext) -> None:
        with self.lock:
            self.in_flight.discard(ctx.order_id)
            self.handled[ctx.order_id].append(ctx.message_id)
            self.calls += 1
            self.last_finished_at = time.monotonic()

    def install(self, app: ConsumerApp) -> None:
        """Register the recorder for every known event type."""
        for event_type in EVENT_TYPES:
            app.router.add_handler(event_type, self)


def expected_order(messages: list[Outgoing]) -> dict[str, list[str]]:
    """Return each order's message ids in publish order."""
    expected: dict[str, list[str]] = defaultdict(list)
    for message in messages:
        expected[message.session_id].append(message.message_id)
    return dict(expected)


@pytest.fixture
def broker() -> Iterator[Any]:
    """A local broker on a free 127.0.0.1 port with one session queue, `QUEUE`."""
    from localbus.testing import run_broker

    with run_broker(
        entities=[QUEUE],
        lock_duration_s=LOCK_DURATION_S,
        max_delivery_count=MAX_DELIVERY_COUNT,
    ) as running:
        yield running
    collect_sdk_leaks()


def collect_sdk_leaks() -> None:
    """Collect leaked SDK sockets now, so their warnings stay with this test.

    Otherwise the garbage collector may run during a later test that does not
    ignore them, often in another module on the same xdist worker.
    """
    gc.collect()


def settings_for(connection_string: str, **overrides: Any) -> Settings:
    """Return settings for a fast test run against the local broker."""
    values: dict[str, Any] = {
        "env": "dev",
        "connection_string": connection_string,
        "entity": QUEUE,
        "max_concurrent_sessions": 8,
        "session_idle_timeout_s": 0.3,
        "accept_timeout_s": 0.5,
        "max_delivery_count": MAX_DELIVERY_COUNT,
        "retry_attempts": 2,
        "retry_backoff_s": 0.01,
        "retry_max_backoff_s": 0.05,
        "handler_timeout_s": 10.0,
        "shutdown_grace_s": 5.0,
        "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(**values)


async def consume(
    app: ConsumerApp, until_idle_s: float = 1.0, timeout_s: float = 60.0
) -> None:
    """Run `app` in batch mode, failing the test if it does not end in `timeout_s`."""
    await asyncio.wait_for(app.run(until_idle_s=until_idle_s), timeout=timeout_s)


# Fault injection at the transport seam --------------------------------------------

# Called before a message is completed, with the session receiver and the message.
CompleteHook = Callable[[SessionReceiver, InboundMessage], Awaitable[None]]


@dataclass
class FaultyTransport:
    """The real Azure transport, with a hook that runs before each complete.

    `before_complete` can wait for the lock to expire or restart the broker, so that
    the complete that follows fails the way it would in production. `received`
    records each received message as (message id, delivery count), and `settled`
    each settlement call as (message id, action).
    """

    inner: Transport
    before_complete: CompleteHook | None = None
    accepts: int = 0
    received: list[tuple[str, int]] = field(default_factory=list)
    settled: list[tuple[str, str]] = field(default_factory=list)

    @property
    def entity(self) -> str:
        """Entity of the wrapped transport."""
        return self.inner.entity

    async def accept_session(self, max_wait_s: float) -> SessionReceiver | None:
        """Accept through the wrapped transport and wrap the receiver."""
        self.accepts += 1
        receiver = await self.inner.accept_session(max_wait_s)
        if receiver is None:
            return None
        return FaultyReceiver(receiver, self)  # type: ignore[return-value]

    async def close(self) -> None:
        """Close the wrapped transport."""
        await self.inner.close()


class FaultyReceiver:
    """A session receiver that reports to its `FaultyTransport`."""

    def __init__(self, inner: SessionReceiver, owner: FaultyTransport) -> None:
        self._inner = inner
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def session_id(self) -> str:
        """Id of the wrapped session."""
        return self._inner.session_id

    @property
    def locked_until(self) -> Any:
        """Lock expiry of the wrapped session."""
        return self._inner.locked_until

    async def receive(self, max_wait_s: float) -> InboundMessage | None:
        """Receive through the wrapped receiver and record the delivery count."""
        message = await self._inner.receive(max_wait_s)
        if message is not None:
            self._owner.received.append((message.message_id, message.delivery_count))
        return message

    async def complete(self, message: InboundMessage) -> None:
        """Run the hook, then complete through the wrapped receiver."""
        if self._owner.before_complete is not None:
            await self._owner.before_complete(self._inner, message)
        self._owner.settled.append((message.message_id, "complete"))
        await self._inner.complete(message)

    async def abandon(self, message: InboundMessage) -> None:
        """Record and abandon through the wrapped receiver."""
        self._owner.settled.append((message.message_id, "abandon"))
        await self._inner.abandon(message)


def faulty_transport(settings: Settings) -> FaultyTransport:
    """Return a `FaultyTransport` around the Azure transport for `settings`."""
    from consumer.transport.azure import AzureTransport

    return FaultyTransport(AzureTransport(settings))


def consumer_environment(settings: dict[str, Any]) -> dict[str, str]:
    """Return this process's environment with `settings` as ORDERS_CONSUMER_ vars."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("ORDERS_CONSUMER_")
    }
    for name, value in settings.items():
        environment[f"ORDERS_CONSUMER_{name.upper()}"] = str(value)
    return environment
