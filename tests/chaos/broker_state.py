"""Reading the broker's final state through the SDK: dead letters and each order.

Runs after the consumers stopped, so every session can be accepted by name. Messages
are peeked, never received, so the inspection changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from azure.servicebus import ServiceBusReceivedMessage, ServiceBusSubQueue
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver

from consumer.checkpoint import CheckpointError, SessionCheckpoint
from tests.chaos.oracle import DeadLetterRecord, FinalSession

PEEK_PAGE = 250
SESSION_WAIT_S = 5.0
# Sessions inspected at once; each needs its own receiver link and management link.
PARALLEL_SESSIONS = 16


async def _peek_all(receiver: ServiceBusReceiver) -> list[ServiceBusReceivedMessage]:
    found: list[ServiceBusReceivedMessage] = []
    next_sequence_number = 1
    while True:
        page = await receiver.peek_messages(
            PEEK_PAGE, sequence_number=next_sequence_number
        )
        if not page:
            return found
        found.extend(page)
        next_sequence_number = max(int(m.sequence_number or 0) for m in page) + 1


async def read_dead_letters(
    connection_string: str, entity: str
) -> list[DeadLetterRecord]:
    """Return every message of the entity's dead-letter queue."""
    async with ServiceBusClient.from_connection_string(connection_string) as client:
        receiver = client.get_queue_receiver(
            entity, sub_queue=ServiceBusSubQueue.DEAD_LETTER
        )
        async with receiver:
            messages = await _peek_all(receiver)
    return [
        DeadLetterRecord(
            message_id=str(message.message_id or ""),
            order_id=str(message.session_id or ""),
            sequence_number=int(message.sequence_number or 0),
            reason=str(message.dead_letter_reason or ""),
            description=str(message.dead_letter_error_description or ""),
        )
        for message in messages
    ]


async def read_sessions(
    connection_string: str, entity: str, order_ids: Sequence[str]
) -> list[FinalSession]:
    """Return the messages and the park state the broker keeps for each order."""
    limit = asyncio.Semaphore(PARALLEL_SESSIONS)
    async with ServiceBusClient.from_connection_string(connection_string) as client:

        async def read_one(order_id: str) -> FinalSession:
            async with limit:
                receiver = client.get_queue_receiver(
                    entity, session_id=order_id, max_wait_time=SESSION_WAIT_S
                )
                async with receiver:
                    raw_state = await receiver.session.get_state()
                    messages = await _peek_all(receiver)
            return _final_session(order_id, raw_state, messages)

        return list(await asyncio.gather(*(read_one(o) for o in order_ids)))


def _final_session(
    order_id: str,
    raw_state: bytes | None,
    messages: list[ServiceBusReceivedMessage],
) -> FinalSession:
    try:
        checkpoint = SessionCheckpoint.decode(bytes(raw_state) if raw_state else None)
    except CheckpointError:
        # An unreadable state parks nothing, so any deferred message counts as stuck.
        checkpoint = SessionCheckpoint()
    return FinalSession(
        order_id=order_id,
        remaining=tuple(
            (int(message.sequence_number or 0), str(message.message_id or ""))
            for message in messages
        ),
        parked=checkpoint.parked is not None,
        deferred_sequence_numbers=checkpoint.deferred_sequence_numbers,
    )
