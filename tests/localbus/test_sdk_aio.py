"""Session flows and error paths driven by the aio azure-servicebus SDK."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    ServiceBusMessage,
    ServiceBusSubQueue,
)
from azure.servicebus.aio import ServiceBusClient
from azure.servicebus.exceptions import (
    OperationTimeoutError,
    SessionCannotBeLockedError,
    SessionLockLostError,
)

from localbus.testing import RunningBroker
from tests.localbus.conftest import QUEUE


async def send(client: ServiceBusClient, session_id: str, *bodies: str) -> None:
    async with client.get_queue_sender(QUEUE) as sender:
        await sender.send_messages(
            [ServiceBusMessage(body, session_id=session_id) for body in bodies]
        )


@pytest.mark.local_broker(max_delivery_count=2)
async def test_aio_settlement_outcomes(local_broker: RunningBroker) -> None:
    async with ServiceBusClient.from_connection_string(
        local_broker.connection_string
    ) as client:
        await send(client, "a1", "done", "retry", "later", "bad")
        async with client.get_queue_receiver(
            QUEUE, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=1
        ) as receiver:
            assert receiver.session.session_id == "a1"
            (done,) = await receiver.receive_messages(max_wait_time=1)
            await receiver.complete_message(done)
            (retry,) = await receiver.receive_messages(max_wait_time=1)
            await receiver.abandon_message(retry)
            (again,) = await receiver.receive_messages(max_wait_time=1)
            assert (str(again), again.delivery_count) == ("retry", 1)
            await receiver.abandon_message(again)
            (later,) = await receiver.receive_messages(max_wait_time=1)
            assert str(later) == "later"
            await receiver.defer_message(later)
            (bad,) = await receiver.receive_messages(max_wait_time=1)
            await receiver.dead_letter_message(bad, reason="Bad", error_description="d")
            (deferred,) = await receiver.receive_deferred_messages(
                [later.sequence_number]
            )
            await receiver.complete_message(deferred)
            await receiver.session.set_state(b"s")
            assert await receiver.session.get_state() == b"s"
            await receiver.session.renew_lock()
        async with client.get_queue_receiver(
            QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=1
        ) as dlq:
            dead = await dlq.receive_messages(max_message_count=5, max_wait_time=1)
            reasons = {str(m): m.dead_letter_reason for m in dead}
            assert reasons == {"retry": "MaxDeliveryCountExceeded", "bad": "Bad"}


async def test_aio_empty_accept_times_out(
    local_broker: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    async with ServiceBusClient.from_connection_string(
        local_broker.connection_string
    ) as client:
        started = time.monotonic()
        with pytest.raises(OperationTimeoutError):
            async with client.get_queue_receiver(
                QUEUE, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=1
            ) as receiver:
                # The open succeeds without a session, as the consumer expects.
                assert not isinstance(receiver.session.session_id, str)
                await receiver.receive_messages(max_wait_time=1)
        assert time.monotonic() - started < 2 * 1 + 1.5
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []


async def test_aio_held_session_cannot_be_locked(local_broker: RunningBroker) -> None:
    async with ServiceBusClient.from_connection_string(
        local_broker.connection_string
    ) as client:
        await send(client, "a2", "x")
        async with client.get_queue_receiver(QUEUE, session_id="a2", max_wait_time=1):
            with pytest.raises(SessionCannotBeLockedError):
                async with client.get_queue_receiver(
                    QUEUE, session_id="a2", max_wait_time=1
                ) as second:
                    await second.receive_messages(max_wait_time=1)


async def wait_for_session_release(broker: RunningBroker, session_id: str) -> None:
    """Wait until the broker's lock on `session_id` has expired."""

    def held() -> bool:
        session = broker.state.stores[QUEUE].sessions.get(session_id)
        return session is not None and session.holder is not None

    deadline = time.monotonic() + 5
    while broker.call(held):
        assert time.monotonic() < deadline, f"session {session_id} still locked"
        await asyncio.sleep(0.02)


@pytest.mark.local_broker(lock_duration_s=1)
async def test_aio_session_lock_lost(local_broker: RunningBroker) -> None:
    async with ServiceBusClient.from_connection_string(
        local_broker.connection_string
    ) as client:
        await send(client, "a3", "x")
        async with client.get_queue_receiver(
            QUEUE, session_id="a3", max_wait_time=1
        ) as receiver:
            (message,) = await receiver.receive_messages(max_wait_time=1)
            await wait_for_session_release(local_broker, "a3")
            with pytest.raises(SessionLockLostError):
                await receiver.complete_message(message)
