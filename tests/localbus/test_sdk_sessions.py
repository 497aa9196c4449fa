"""Session queues driven by the synchronous azure-servicebus SDK."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusSubQueue,
)
from azure.servicebus.exceptions import (
    OperationTimeoutError,
    SessionCannotBeLockedError,
    SessionLockLostError,
)

from localbus.testing import RunningBroker
from tests.localbus.conftest import QUEUE


def send(client: ServiceBusClient, session_id: str, *bodies: str) -> None:
    with client.get_queue_sender(QUEUE) as sender:
        sender.send_messages(
            [ServiceBusMessage(body, session_id=session_id) for body in bodies]
        )


def bodies(messages: list) -> list[str]:
    return [str(message) for message in messages]


def test_next_available_session_receives_in_order(client: ServiceBusClient) -> None:
    send(client, "order-1", "a", "b", "c")
    with client.get_queue_receiver(
        QUEUE, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=2
    ) as receiver:
        assert receiver.session.session_id == "order-1"
        received = receiver.receive_messages(max_message_count=10, max_wait_time=1)
        assert bodies(received) == ["a", "b", "c"]
        assert [m.sequence_number for m in received] == sorted(
            m.sequence_number for m in received
        )
        for message in received:
            assert message.session_id == "order-1"
            assert message.delivery_count == 0
            assert message.enqueued_time_utc is not None
            receiver.complete_message(message)


def test_single_message_round_trip_keeps_properties(client: ServiceBusClient) -> None:
    with client.get_queue_sender(QUEUE) as sender:
        sender.send_messages(
            ServiceBusMessage(
                b'{"x": 1}',
                session_id="order-2",
                message_id="m-1",
                subject="ORDER_CREATED",
                correlation_id="c-1",
                content_type="application/json",
                application_properties={"eventType": "ORDER_CREATED"},
            )
        )
    with client.get_queue_receiver(QUEUE, session_id="order-2", max_wait_time=1) as r:
        (message,) = r.receive_messages(max_wait_time=1)
        assert b"".join(message.body) == b'{"x": 1}'
        assert message.message_id == "m-1"
        assert message.subject == "ORDER_CREATED"
        assert message.correlation_id == "c-1"
        assert message.content_type == "application/json"
        assert message.application_properties == {b"eventType": b"ORDER_CREATED"}
        r.complete_message(message)


def test_abandon_returns_message_to_session_head(client: ServiceBusClient) -> None:
    send(client, "order-3", "first", "second")
    with client.get_queue_receiver(QUEUE, session_id="order-3", max_wait_time=1) as r:
        (first,) = r.receive_messages(max_wait_time=1)
        assert str(first) == "first"
        r.abandon_message(first)
        (again,) = r.receive_messages(max_wait_time=1)
        assert str(again) == "first"
        assert again.delivery_count == 1
        r.complete_message(again)
        (second,) = r.receive_messages(max_wait_time=1)
        assert str(second) == "second"
        r.complete_message(second)


def test_dead_letter_keeps_reason_and_description(client: ServiceBusClient) -> None:
    send(client, "order-4", "poison")
    with client.get_queue_receiver(QUEUE, session_id="order-4", max_wait_time=1) as r:
        (message,) = r.receive_messages(max_wait_time=1)
        r.dead_letter_message(message, reason="SchemaInvalid", error_description="bad")
    with client.get_queue_receiver(
        QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=1
    ) as dlq:
        (dead,) = dlq.receive_messages(max_wait_time=1)
        assert str(dead) == "poison"
        assert dead.dead_letter_reason == "SchemaInvalid"
        assert dead.dead_letter_error_description == "bad"
        assert dead.session_id == "order-4"
        dlq.complete_message(dead)


@pytest.mark.local_broker(max_delivery_count=3)
def test_max_delivery_count_dead_letters(client: ServiceBusClient) -> None:
    send(client, "order-5", "flaky")
    counts = []
    for _ in range(3):
        with client.get_queue_receiver(
            QUEUE, session_id="order-5", max_wait_time=1
        ) as r:
            (message,) = r.receive_messages(max_wait_time=1)
            counts.append(message.delivery_count)
            r.abandon_message(message)
    assert counts == [0, 1, 2]
    with client.get_queue_receiver(QUEUE, session_id="order-5", max_wait_time=1) as r:
        assert r.receive_messages(max_wait_time=0.5) == []
    with client.get_queue_receiver(
        QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=1
    ) as dlq:
        (dead,) = dlq.receive_messages(max_wait_time=1)
        assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
        assert "3" in (dead.dead_letter_error_description or "")
        dlq.complete_message(dead)


def test_defer_then_receive_by_sequence_number(client: ServiceBusClient) -> None:
    send(client, "order-6", "later", "now")
    with client.get_queue_receiver(QUEUE, session_id="order-6", max_wait_time=1) as r:
        (later,) = r.receive_messages(max_wait_time=1)
        number = later.sequence_number
        r.defer_message(later)
        (now,) = r.receive_messages(max_wait_time=1)
        assert str(now) == "now"
        r.complete_message(now)
        (deferred,) = r.receive_deferred_messages([number])
        assert str(deferred) == "later"
        r.complete_message(deferred)
        assert r.peek_messages(max_message_count=5) == []


def test_session_state_and_lock_renewal(client: ServiceBusClient) -> None:
    send(client, "order-7", "x")
    with client.get_queue_receiver(QUEUE, session_id="order-7", max_wait_time=1) as r:
        assert r.session.get_state() is None
        r.session.set_state(b"checkpoint-1")
        assert r.session.get_state() == b"checkpoint-1"
        before = r.session.locked_until_utc
        renewed = r.session.renew_lock()
        assert renewed >= before
    with client.get_queue_receiver(QUEUE, session_id="order-7", max_wait_time=1) as r:
        assert r.session.get_state() == b"checkpoint-1"


def test_peek_does_not_lock(client: ServiceBusClient) -> None:
    send(client, "order-8", "p1", "p2")
    with client.get_queue_receiver(QUEUE, session_id="order-8", max_wait_time=1) as r:
        peeked = r.peek_messages(max_message_count=5)
        assert bodies(peeked) == ["p1", "p2"]
        received = r.receive_messages(max_message_count=5, max_wait_time=1)
        assert bodies(received) == ["p1", "p2"]


def test_empty_queue_accept_times_out(
    client: ServiceBusClient, caplog: pytest.LogCaptureFixture
) -> None:
    started = time.monotonic()
    with pytest.raises(OperationTimeoutError):
        with client.get_queue_receiver(
            QUEUE, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=1
        ) as receiver:
            receiver.receive_messages(max_wait_time=1)
    assert time.monotonic() - started < 2 * 1 + 1.5
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == []


def test_waiting_accept_is_woken_by_send(
    client: ServiceBusClient, local_broker: RunningBroker
) -> None:
    receiver = client.get_queue_receiver(
        QUEUE, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=10
    )

    def send_soon() -> None:
        with ServiceBusClient.from_connection_string(
            local_broker.connection_string
        ) as other:
            send(other, "order-9", "wake")

    sender = threading.Thread(target=send_soon)
    started = time.monotonic()
    sender.start()
    with receiver:
        assert receiver.session.session_id == "order-9"
        (message,) = receiver.receive_messages(max_wait_time=2)
        receiver.complete_message(message)
    sender.join()
    assert time.monotonic() - started < 8


def test_second_receiver_cannot_lock_held_session(client: ServiceBusClient) -> None:
    send(client, "order-10", "x")
    with client.get_queue_receiver(QUEUE, session_id="order-10", max_wait_time=1):
        with pytest.raises(SessionCannotBeLockedError):
            with client.get_queue_receiver(
                QUEUE, session_id="order-10", max_wait_time=1
            ) as second:
                second.receive_messages(max_wait_time=1)


@pytest.mark.local_broker(lock_duration_s=1)
def test_session_lock_expiry_raises_lock_lost(
    client: ServiceBusClient, local_broker: RunningBroker
) -> None:
    send(client, "order-11", "slow", "next")
    with client.get_queue_receiver(QUEUE, session_id="order-11", max_wait_time=1) as r:
        (message,) = r.receive_messages(max_wait_time=1)
        deadline = time.monotonic() + 5
        while local_broker.call(lambda: _holder(local_broker, "order-11")) is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(SessionLockLostError):
            r.receive_messages(max_wait_time=1)
            r.complete_message(message)
    with client.get_queue_receiver(QUEUE, session_id="order-11", max_wait_time=1) as r:
        again = r.receive_messages(max_message_count=5, max_wait_time=1)
        assert bodies(again) == ["slow", "next"]
        assert again[0].delivery_count == 1


def _holder(broker: RunningBroker, session_id: str) -> int | None:
    session = broker.state.stores[QUEUE].sessions.get(session_id)
    return session.holder if session is not None else None


def test_closing_receiver_returns_unsettled_in_order(client: ServiceBusClient) -> None:
    send(client, "order-12", "one", "two", "three")
    with client.get_queue_receiver(QUEUE, session_id="order-12", max_wait_time=1) as r:
        received = r.receive_messages(max_message_count=2, max_wait_time=1)
        assert bodies(received) == ["one", "two"]
    with client.get_queue_receiver(QUEUE, session_id="order-12", max_wait_time=1) as r:
        again = r.receive_messages(max_message_count=5, max_wait_time=1)
        assert bodies(again) == ["one", "two", "three"]
