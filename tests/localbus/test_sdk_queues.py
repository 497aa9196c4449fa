"""Plain queues, topics, scheduling, TTL, duplicates and limits, via the sync SDK."""

from __future__ import annotations

import datetime
import time

import pytest
from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus.exceptions import (
    MessageSizeExceededError,
    MessagingEntityNotFoundError,
    ServiceBusError,
)

from localbus.config import (
    CorrelationFilter,
    QueueConfig,
    QueueSettings,
    SubscriptionConfig,
    TopicConfig,
)
from localbus.testing import RunningBroker

PLAIN = QueueConfig("jobs", QueueSettings(requires_session=False, lock_duration_s=2))
EXPIRING = QueueConfig(
    "expiring",
    QueueSettings(requires_session=False, dead_letter_on_expiration=True),
)
DEDUPED = QueueConfig(
    "deduped", QueueSettings(requires_session=False), duplicate_detection=True
)
TOPIC = TopicConfig(
    "events",
    subscriptions=(
        SubscriptionConfig("audit", QueueSettings(requires_session=False)),
        SubscriptionConfig(
            "created",
            QueueSettings(requires_session=False),
            rules=(CorrelationFilter(subject="ORDER_CREATED"),),
        ),
    ),
)
ENTITIES = [PLAIN, EXPIRING, DEDUPED, TOPIC]
pytestmark = pytest.mark.local_broker(entities=ENTITIES)


def test_plain_queue_send_receive_complete(client: ServiceBusClient) -> None:
    with client.get_queue_sender("jobs") as sender:
        sender.send_messages([ServiceBusMessage("j1"), ServiceBusMessage("j2")])
    with client.get_queue_receiver("jobs", max_wait_time=1) as receiver:
        received = receiver.receive_messages(max_message_count=2, max_wait_time=1)
        assert [str(m) for m in received] == ["j1", "j2"]
        assert received[0].locked_until_utc is not None
        for message in received:
            receiver.complete_message(message)
        assert receiver.receive_messages(max_wait_time=0.3) == []


def test_receive_and_delete_removes_on_delivery(
    client: ServiceBusClient, local_broker: RunningBroker
) -> None:
    with client.get_queue_sender("jobs") as sender:
        sender.send_messages(ServiceBusMessage("gone"))
    with client.get_queue_receiver(
        "jobs", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE, max_wait_time=1
    ) as receiver:
        (message,) = receiver.receive_messages(max_wait_time=1)
        assert str(message) == "gone"
    assert (
        local_broker.call(lambda: len(local_broker.state.stores["jobs"].messages)) == 0
    )


def test_message_lock_renewal_extends_lock(client: ServiceBusClient) -> None:
    with client.get_queue_sender("jobs") as sender:
        sender.send_messages(ServiceBusMessage("long"))
    with client.get_queue_receiver("jobs", max_wait_time=1) as receiver:
        (message,) = receiver.receive_messages(max_wait_time=1)
        before = message.locked_until_utc
        time.sleep(0.2)
        after = receiver.renew_message_lock(message)
        assert after > before
        receiver.complete_message(message)


def test_message_over_max_size_is_rejected(client: ServiceBusClient) -> None:
    with client.get_queue_sender("jobs") as sender:
        with pytest.raises(MessageSizeExceededError):
            sender.send_messages(ServiceBusMessage(b"x" * (300 * 1024)))


def test_unknown_entity_is_not_found(client: ServiceBusClient) -> None:
    with pytest.raises(MessagingEntityNotFoundError):
        with client.get_queue_sender("missing") as sender:
            sender.send_messages(ServiceBusMessage("x"))


def test_topic_subscriptions_filter_on_subject(client: ServiceBusClient) -> None:
    with client.get_topic_sender("events") as sender:
        sender.send_messages(ServiceBusMessage("c", subject="ORDER_CREATED"))
        sender.send_messages(ServiceBusMessage("p", subject="ORDER_PAID"))
    with client.get_subscription_receiver("events", "audit", max_wait_time=1) as r:
        audit = r.receive_messages(max_message_count=5, max_wait_time=1)
        assert sorted(str(m) for m in audit) == ["c", "p"]
    with client.get_subscription_receiver("events", "created", max_wait_time=1) as r:
        created = r.receive_messages(max_message_count=5, max_wait_time=1)
        assert [str(m) for m in created] == ["c"]
        r.dead_letter_message(created[0], reason="Check")
    with client.get_subscription_receiver(
        "events", "created", sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=1
    ) as r:
        (dead,) = r.receive_messages(max_wait_time=1)
        assert dead.dead_letter_reason == "Check"


def test_scheduled_message_and_cancel(client: ServiceBusClient) -> None:
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1)
    with client.get_queue_sender("jobs") as sender:
        (kept,) = sender.schedule_messages(ServiceBusMessage("kept"), soon)
        (dropped,) = sender.schedule_messages(ServiceBusMessage("dropped"), soon)
        sender.cancel_scheduled_messages(dropped)
    assert kept != dropped
    with client.get_queue_receiver("jobs", max_wait_time=4) as receiver:
        received = receiver.receive_messages(max_message_count=2, max_wait_time=3)
        assert [str(m) for m in received] == ["kept"]
        # Service Bus enqueues a due scheduled message under a new sequence number.
        assert received[0].sequence_number > dropped
        receiver.complete_message(received[0])


def test_ttl_expiry_dead_letters(client: ServiceBusClient) -> None:
    with client.get_queue_sender("expiring") as sender:
        sender.send_messages(
            ServiceBusMessage("stale", time_to_live=datetime.timedelta(seconds=1))
        )
    with client.get_queue_receiver(
        "expiring", sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=3
    ) as receiver:
        (dead,) = receiver.receive_messages(max_wait_time=3)
        assert str(dead) == "stale"
        assert dead.dead_letter_reason == "TTLExpiredException"


def test_duplicate_message_id_is_dropped(client: ServiceBusClient) -> None:
    with client.get_queue_sender("deduped") as sender:
        sender.send_messages(ServiceBusMessage("first", message_id="same"))
        sender.send_messages(ServiceBusMessage("second", message_id="same"))
    with client.get_queue_receiver(
        "deduped",
        receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE,
        max_wait_time=1,
    ) as receiver:
        received = receiver.receive_messages(max_message_count=5, max_wait_time=0.5)
        assert [str(m) for m in received] == ["first"]


def test_session_entity_rejects_message_without_session(
    local_broker: RunningBroker,
) -> None:
    from localbus.testing import run_broker

    with run_broker(entities=["needs.session"]) as broker:
        with ServiceBusClient.from_connection_string(broker.connection_string) as sdk:
            with sdk.get_queue_sender("needs.session") as sender:
                with pytest.raises(ServiceBusError):
                    sender.send_messages(ServiceBusMessage("no session"))
