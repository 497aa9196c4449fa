"""Benchmark workloads: order events, their messages, and publishing them.

Every event is valid for its schema (built with `consumer.testing.make_event`) and
carries a unique message id, so the consumer's checkpoint never skips one as a
duplicate. Orders are interleaved round-robin, as in a live stream where many orders
are in progress at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from azure.servicebus import ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient

from consumer.publish import build_message, send_batched_async
from consumer.testing import make_event

# The lifecycle an order's events cycle through. An order with more events than this
# list starts again at ORDER_UPDATED, which the schema accepts at any point.
LIFECYCLE = (
    "ORDER_CREATED",
    "PAYMENT_AUTHORIZED",
    "PAYMENT_CAPTURED",
    "FULFILLMENT_STARTED",
    "ORDER_SHIPPED",
    "ORDER_DELIVERED",
    "CUSTOMER_NOTIFIED",
)
REPEATED = ("ORDER_UPDATED", "CUSTOMER_NOTIFIED")
# Batches are capped below the SDK's default so they stay under the local broker's
# 262,144-byte message limit. NOTE: a batch that create_message_batch() filled to its
# default maximum was rejected as 3 bytes too large (azure-servicebus 7.15.0, localbus).
MAX_BATCH_BYTES = 200_000
# Steady-rate publishing sends one batch per tick.
PUBLISH_TICK_S = 0.05


def event_type_at(index: int) -> str:
    """Return the event type of an order's `index`-th event (0-based)."""
    if index < len(LIFECYCLE):
        return LIFECYCLE[index]
    return REPEATED[(index - len(LIFECYCLE)) % len(REPEATED)]


def order_messages(
    orders: int, events_per_order: int, prefix: str
) -> list[ServiceBusMessage]:
    """Build `orders * events_per_order` messages, orders interleaved round-robin.

    Order ids are `{prefix}-{n}` and message ids `{prefix}-{n}-{index}`.
    """
    bodies: list[dict[str, Any]] = []
    message_ids: list[str] = []
    for index in range(events_per_order):
        event_type = event_type_at(index)
        for number in range(orders):
            order_id = f"{prefix}-{number}"
            bodies.append(make_event(event_type, order_id))
            message_ids.append(f"{order_id}-{index}")
    return [
        build_message(body, message_id=message_id)
        for body, message_id in zip(bodies, message_ids, strict=True)
    ]


async def publish_all(
    connection_string: str, entity: str, messages: Sequence[ServiceBusMessage]
) -> float:
    """Send `messages` in batches on one client and return the seconds it took."""
    started = time.perf_counter()
    async with ServiceBusClient.from_connection_string(connection_string) as client:
        async with client.get_queue_sender(queue_name=entity) as sender:
            await send_batched_async(sender, messages, max_batch_bytes=MAX_BATCH_BYTES)
    return time.perf_counter() - started


async def publish_steadily(
    connection_string: str,
    entity: str,
    messages: Sequence[ServiceBusMessage],
    rate_per_s: float,
) -> float:
    """Send `messages` at `rate_per_s` and return the rate achieved, per second.

    Every tick sends what is due by then, so the average rate is kept while the broker
    keeps up, and a slow send is caught up on the next tick.
    """
    started = time.perf_counter()
    sent = 0
    async with ServiceBusClient.from_connection_string(connection_string) as client:
        async with client.get_queue_sender(queue_name=entity) as sender:
            while sent < len(messages):
                due = int(_elapsed(started) * rate_per_s) + 1
                target = min(len(messages), due)
                if target > sent:
                    await sender.send_messages(list(messages[sent:target]))
                    sent = target
                await asyncio.sleep(PUBLISH_TICK_S)
    return sent / max(_elapsed(started), 1e-9)


def _elapsed(started: float) -> float:
    return time.perf_counter() - started
