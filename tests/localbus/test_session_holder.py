"""Session requests on `$management` are accepted only from the session's holder.

The holder is the receive link that accepted the session. azure-servicebus names it
in the `associated-link-name` property of each request. A request that names no link
is accepted from the holder's connection.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSession
from azure.servicebus.exceptions import SessionLockLostError
from proton import Message

from localbus.errors import SESSION_LOCK_LOST
from localbus.testing import RunningBroker
from tests.localbus.conftest import QUEUE
from tests.localbus.rawclient import RawClient, management_request

pytestmark = pytest.mark.local_broker(entities=[QUEUE])

MANAGEMENT = f"{QUEUE}/$management"
CHECKPOINT = b'{"lastSequenceNumber": 41}'
FORGED = b'{"lastSequenceNumber": 999999}'


class ManagementClient:
    """A raw AMQP connection with a `$management` link pair on the queue."""

    def __init__(self, broker: RunningBroker) -> None:
        self.raw = RawClient(broker.host, broker.port)
        self.replies = self.raw.receiver(MANAGEMENT, None, session_filter=False)
        self.requests = self.raw.sender(MANAGEMENT)

    def request(
        self, operation: str, body: dict[str, object], link_name: str | None = None
    ) -> Message:
        """Send one request and return the reply."""
        message = management_request(operation, body)
        if link_name is not None:
            message.properties["associated-link-name"] = link_name
        self.raw.start_transfer(self.requests, message)
        self.raw.pump_until(
            lambda: (
                self.replies.current is not None and not self.replies.current.partial
            )
        )
        delivery = self.replies.current
        reply = Message()
        reply.decode(self.replies.recv(delivery.pending))
        self.replies.advance()
        delivery.settle()
        return reply


@pytest.fixture
def other(local_broker: RunningBroker) -> Iterator[ManagementClient]:
    """A second connection that holds no session lock."""
    client = ManagementClient(local_broker)
    yield client
    client.raw.close_abruptly()


def send(client: ServiceBusClient, session_id: str, *bodies: str) -> None:
    with client.get_queue_sender(QUEUE) as sender:
        sender.send_messages(
            [ServiceBusMessage(body, session_id=session_id) for body in bodies]
        )


def assert_lock_lost(reply: Message) -> None:
    assert reply.properties["statusCode"] == 410
    assert reply.properties["errorCondition"] == SESSION_LOCK_LOST


def receive_link_name(receiver: object) -> str:
    """Return the name azure-servicebus 7.15 sends as `associated-link-name`."""
    return str(receiver._handler._link.name)  # type: ignore[attr-defined]


def test_state_from_other_connection_rejected(
    client: ServiceBusClient, other: ManagementClient
) -> None:
    send(client, "held", "x")
    with client.get_queue_receiver(QUEUE, session_id="held", max_wait_time=1) as r:
        r.session.set_state(CHECKPOINT)
        body = {"session-id": "held", "session-state": FORGED}
        set_reply = other.request("set-session-state", body)
        get_reply = other.request("get-session-state", {"session-id": "held"})
        renew_reply = other.request("renew-session-lock", {"session-id": "held"})

        assert_lock_lost(set_reply)
        assert_lock_lost(get_reply)
        assert_lock_lost(renew_reply)
        assert r.session.get_state() == CHECKPOINT


def test_spoofed_link_name_rejected(
    client: ServiceBusClient, other: ManagementClient
) -> None:
    send(client, "spoofed", "x")
    with client.get_queue_receiver(QUEUE, session_id="spoofed", max_wait_time=1) as r:
        r.session.set_state(CHECKPOINT)
        body = {"session-id": "spoofed", "session-state": FORGED}
        reply = other.request("set-session-state", body, receive_link_name(r))

        assert_lock_lost(reply)
        assert r.session.get_state() == CHECKPOINT


def test_other_session_receiver_rejected(client: ServiceBusClient) -> None:
    send(client, "first", "x")
    send(client, "second", "y")
    with (
        client.get_queue_receiver(QUEUE, session_id="first", max_wait_time=1) as first,
        client.get_queue_receiver(
            QUEUE, session_id="second", max_wait_time=1
        ) as second,
    ):
        first.session.set_state(CHECKPOINT)
        # The SDK sends these with the session id "first" and the link of `second`.
        borrowed = ServiceBusSession("first", second)
        with pytest.raises(SessionLockLostError):
            borrowed.set_state(FORGED)
        with pytest.raises(SessionLockLostError):
            borrowed.get_state()
        with pytest.raises(SessionLockLostError):
            borrowed.renew_lock()

        # The SDK closes `second` after the error, so only `first` can be read.
        assert first.session.get_state() == CHECKPOINT


def test_deferred_message_needs_holder(
    client: ServiceBusClient, other: ManagementClient
) -> None:
    send(client, "deferred", "later", "now")
    with client.get_queue_receiver(QUEUE, session_id="deferred", max_wait_time=1) as r:
        (later,) = r.receive_messages(max_wait_time=1)
        number = later.sequence_number
        r.defer_message(later)
        body = {
            "sequence-numbers": [number],
            "receiver-settle-mode": 1,
            "session-id": "deferred",
        }
        assert_lock_lost(other.request("receive-by-sequence-number", body))

        (deferred,) = r.receive_deferred_messages([number])
        token = uuid.UUID(str(deferred.lock_token))
        complete = {"disposition-status": "completed", "lock-tokens": [token]}
        assert_lock_lost(other.request("update-disposition", complete))
        assert_lock_lost(other.request("renew-lock", {"lock-tokens": [token]}))

        r.complete_message(deferred)
        (now,) = r.receive_messages(max_wait_time=1)
        r.complete_message(now)
        assert r.peek_messages(max_message_count=5) == []


def test_holder_connection_without_link_name(
    client: ServiceBusClient, local_broker: RunningBroker
) -> None:
    send(client, "raw-held", "x")
    send(client, "sdk-held", "y")
    holder = ManagementClient(local_broker)
    try:
        holder.raw.receiver(QUEUE, "raw-held")
        with client.get_queue_receiver(QUEUE, session_id="sdk-held", max_wait_time=1):
            own = {"session-id": "raw-held", "session-state": CHECKPOINT}
            foreign = {"session-id": "sdk-held", "session-state": FORGED}
            own_reply = holder.request("set-session-state", own)
            foreign_reply = holder.request("set-session-state", foreign)
            read_reply = holder.request("get-session-state", {"session-id": "raw-held"})
    finally:
        holder.raw.close_abruptly()

    assert own_reply.properties["statusCode"] == 200
    assert_lock_lost(foreign_reply)
    assert read_reply.properties["statusCode"] == 200
    assert bytes(read_reply.body["session-state"]) == CHECKPOINT
