"""`$management` operations that the SDK does not expose, sent by hand."""

from __future__ import annotations

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from proton import Message, timestamp

from localbus.testing import RunningBroker
from tests.localbus.conftest import QUEUE
from tests.localbus.rawclient import RawClient, management_request

pytestmark = pytest.mark.local_broker(entities=[QUEUE])


def request_reply(broker: RunningBroker, operation: str, body: dict) -> Message:  # type: ignore[type-arg]
    client = RawClient(broker.host, broker.port)
    address = f"{QUEUE}/$management"
    replies = client.receiver(address, None, session_filter=False)
    requests = client.sender(address)
    client.start_transfer(requests, management_request(operation, body))
    client.pump_until(
        lambda: replies.current is not None and not replies.current.partial
    )
    reply = Message()
    reply.decode(replies.recv(replies.current.pending))
    client.close_abruptly()
    return reply


def test_get_message_sessions_lists_sessions(local_broker: RunningBroker) -> None:
    with ServiceBusClient.from_connection_string(local_broker.connection_string) as sdk:
        with sdk.get_queue_sender(QUEUE) as sender:
            sender.send_messages(
                [
                    ServiceBusMessage("1", session_id="b"),
                    ServiceBusMessage("2", session_id="a"),
                ]
            )
    body = {"skip": 0, "top": 10, "last-updated-time": timestamp(0)}
    reply = request_reply(local_broker, "get-message-sessions", body)
    assert reply.properties["statusCode"] == 200
    assert list(reply.body["sessions-ids"]) == ["a", "b"]


def test_unknown_operation_is_rejected(local_broker: RunningBroker) -> None:
    reply = request_reply(local_broker, "no-such-operation", {})
    assert reply.properties["statusCode"] == 400
    assert reply.properties["errorCondition"] == "amqp:not-allowed"
