"""Per-session ordering under concurrency, driven by the aio SDK."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import pytest
from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver
from azure.servicebus.exceptions import OperationTimeoutError

from localbus.testing import RunningBroker
from tests.localbus.conftest import QUEUE

SESSIONS = 200
MESSAGES_PER_SESSION = 50
RECEIVERS = 8
ABANDON_RATE = 0.02


async def send_interleaved(client: ServiceBusClient) -> dict[str, list[str]]:
    """Send message k of every session before message k+1 of any, in batches."""
    expected: dict[str, list[str]] = defaultdict(list)
    async with client.get_queue_sender(QUEUE) as sender:
        for index in range(MESSAGES_PER_SESSION):
            batch = await sender.create_message_batch()
            for session in range(SESSIONS):
                session_id = f"order-{session}"
                body = f"{session_id}:{index}"
                expected[session_id].append(body)
                batch.add_message(ServiceBusMessage(body, session_id=session_id))
            await sender.send_messages(batch)
    return expected


async def drain_sessions(
    client: ServiceBusClient, completed: dict[str, list[str]], rng: random.Random
) -> int:
    """Accept sessions until none is left; return how many messages it abandoned."""
    abandoned = 0
    while True:
        receiver = client.get_queue_receiver(
            QUEUE, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=1
        )
        try:
            async with receiver:
                abandoned += await drain_one_session(receiver, completed, rng)
        except OperationTimeoutError:
            # The accept timed out: no session with messages is left.
            return abandoned


async def drain_one_session(
    receiver: ServiceBusReceiver, completed: dict[str, list[str]], rng: random.Random
) -> int:
    """Complete the session's messages in order until one is abandoned.

    After an abandon the caller closes the receiver, as the consumer does. The SDK may
    already hold later messages of the session that a short batch did not return, and
    receiving on would hand those out before the abandoned one comes back. Closing
    returns every message the receiver holds, and the broker puts them back in
    sequence order.
    """
    session_id = receiver.session.session_id
    while batch := await receiver.receive_messages(
        max_message_count=MESSAGES_PER_SESSION, max_wait_time=0.2
    ):
        for position, message in enumerate(batch):
            if message.delivery_count == 0 and rng.random() < ABANDON_RATE:
                for rest in batch[position:]:
                    await receiver.abandon_message(rest)
                return 1
            completed[session_id].append(str(message))
            await receiver.complete_message(message)
    return 0


@pytest.mark.slow
@pytest.mark.local_broker(entities=[QUEUE], lock_duration_s=30)
async def test_sessions_keep_send_order_across_receivers(
    local_broker: RunningBroker,
) -> None:
    async with ServiceBusClient.from_connection_string(
        local_broker.connection_string
    ) as client:
        expected = await send_interleaved(client)
        completed: dict[str, list[str]] = defaultdict(list)
        workers = [
            drain_sessions(client, completed, random.Random(seed))
            for seed in range(RECEIVERS)
        ]
        abandoned = await asyncio.wait_for(asyncio.gather(*workers), timeout=100)
    assert sum(abandoned) > 0
    assert set(completed) == set(expected)
    for session_id, bodies in expected.items():
        assert completed[session_id] == bodies, session_id
