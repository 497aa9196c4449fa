"""Fault injection through the broker's admin node and `localbus.testing`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus.exceptions import (
    MessageLockLostError,
    ServiceBusConnectionError,
    ServiceBusError,
    SessionLockLostError,
)
from proton import Message
from proton.utils import BlockingConnection, LinkDetached, SendException

from consumer.config import LOCAL_BROKER_KEY_NAME
from localbus.admin import ADMIN_ADDRESS, check_admin_access
from localbus.admin_client import AdminClient, AdminError
from localbus.auth import SharedAccessKey
from localbus.errors import UNAUTHORIZED, BrokerError
from localbus.sasl import SaslIdentity
from localbus.testing import BrokerProcess, RunningBroker, admin_client
from tests.localbus.conftest import QUEUE

OTHER_QUEUE = "orders.other.events"

# The SDK reports a settlement after the session lock expired as session-lock-lost
# when it has read the broker's detach, and as message-lock-lost when it has not.
LOCK_LOST = (SessionLockLostError, MessageLockLostError)

pytestmark = pytest.mark.local_broker(entities=[QUEUE, OTHER_QUEUE])


def send(sdk: ServiceBusClient, queue: str, session_id: str, body: str) -> None:
    with sdk.get_queue_sender(queue) as sender:
        sender.send_messages(ServiceBusMessage(body, session_id=session_id))


def test_cut_connections_of_one_entity(local_broker: RunningBroker) -> None:
    with ServiceBusClient.from_connection_string(local_broker.connection_string) as sdk:
        send(sdk, QUEUE, "cut", "held")
        send(sdk, OTHER_QUEUE, "kept", "other")
        cut_receiver = sdk.get_queue_receiver(QUEUE, session_id="cut", max_wait_time=1)
        kept_receiver = sdk.get_queue_receiver(
            OTHER_QUEUE, session_id="kept", max_wait_time=1
        )
        (held,) = cut_receiver.receive_messages(max_wait_time=1)
        (other,) = kept_receiver.receive_messages(max_wait_time=1)
        assert local_broker.cut_connections(QUEUE) == 1
        with pytest.raises((ServiceBusConnectionError, SessionLockLostError)):
            cut_receiver.complete_message(held)
        kept_receiver.complete_message(other)
        cut_receiver.close()
        kept_receiver.close()
        with sdk.get_queue_receiver(QUEUE, session_id="cut", max_wait_time=1) as r:
            (again,) = r.receive_messages(max_wait_time=1)
            assert (str(again), again.delivery_count) == ("held", 1)
            r.complete_message(again)


def test_expire_session_locks_in_process(local_broker: RunningBroker) -> None:
    with ServiceBusClient.from_connection_string(local_broker.connection_string) as sdk:
        send(sdk, QUEUE, "expiring", "held")
        with sdk.get_queue_receiver(QUEUE, session_id="expiring", max_wait_time=1) as r:
            (held,) = r.receive_messages(max_wait_time=1)
            assert local_broker.expire_session_locks(QUEUE) == ["expiring"]
            with pytest.raises(LOCK_LOST):
                r.complete_message(held)


@pytest.mark.local_broker(entities=[QUEUE], lock_duration_s=60)
def test_process_broker_faults(local_broker_process: BrokerProcess) -> None:
    broker = local_broker_process
    with ServiceBusClient.from_connection_string(broker.connection_string) as sdk:
        send(sdk, QUEUE, "s1", "first")
        with sdk.get_queue_receiver(QUEUE, session_id="s1", max_wait_time=1) as r:
            (held,) = r.receive_messages(max_wait_time=1)
            assert broker.expire_session_locks(session_id="s1") == ["s1"]
            with pytest.raises(LOCK_LOST):
                r.complete_message(held)
        receiver = sdk.get_queue_receiver(QUEUE, session_id="s1", max_wait_time=1)
        (again,) = receiver.receive_messages(max_wait_time=1)
        assert again.delivery_count == 1
        assert broker.cut_connections() == 1
        with pytest.raises(ServiceBusError):
            receiver.complete_message(again)
        receiver.close()


def test_admin_rejects_wrong_key(local_broker: RunningBroker) -> None:
    wrong = SharedAccessKey(LOCAL_BROKER_KEY_NAME, "not-the-key")
    with pytest.raises(AdminError, match="unauthorized"):
        AdminClient(local_broker.host, local_broker.port, wrong)


def test_admin_rejects_anonymous(local_broker: RunningBroker) -> None:
    connection = BlockingConnection(
        f"amqp://{local_broker.host}:{local_broker.port}",
        timeout=10,
        allowed_mechs="ANONYMOUS",
    )
    try:
        with pytest.raises(LinkDetached, match="unauthorized"):
            connection.create_receiver(ADMIN_ADDRESS)
        sender = connection.create_sender(ADMIN_ADDRESS)
        request = Message(
            reply_to=ADMIN_ADDRESS, properties={"operation": "cut-connections"}
        )
        with pytest.raises((SendException, LinkDetached), match="unauthorized"):
            sender.send(request)
    finally:
        connection.close()


def test_admin_rejects_unknown_operation(local_broker: RunningBroker) -> None:
    with admin_client(local_broker.host, local_broker.port) as admin:
        with pytest.raises(AdminError, match="not supported"):
            admin.request("drop-everything", {})
        assert admin.cut_connections() == 0


@pytest.mark.parametrize(
    ("identity", "peer"),
    [
        (SaslIdentity("PLAIN", LOCAL_BROKER_KEY_NAME, key_verified=True), "10.1.2.3"),
        (SaslIdentity("PLAIN", LOCAL_BROKER_KEY_NAME, key_verified=False), "::1"),
        (SaslIdentity("ANONYMOUS"), "127.0.0.1"),
        (None, "127.0.0.1"),
    ],
)
def test_admin_access_needs_key_and_loopback(
    identity: SaslIdentity | None, peer: str
) -> None:
    connection = SimpleNamespace(localbus_identity=identity, localbus_peer=(peer, 1))
    with pytest.raises(BrokerError) as caught:
        check_admin_access(connection)  # type: ignore[arg-type]
    assert caught.value.condition == UNAUTHORIZED


def test_admin_access_for_key_on_loopback() -> None:
    identity = SaslIdentity("PLAIN", LOCAL_BROKER_KEY_NAME, key_verified=True)
    for peer in ("127.0.0.1", "::1"):
        connection = SimpleNamespace(
            localbus_identity=identity, localbus_peer=(peer, 1)
        )
        check_admin_access(connection)  # type: ignore[arg-type]
