"""Access to `$management` on a broker that requires a CBS token."""

from __future__ import annotations

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from proton import Disposition, Message, symbol, timestamp

from localbus.errors import UNAUTHORIZED
from localbus.testing import RunningBroker
from tests.localbus.conftest import QUEUE
from tests.localbus.rawclient import RawClient, management_request

pytestmark = pytest.mark.local_broker(entities=[QUEUE], require_auth=True)

MANAGEMENT = f"{QUEUE}/$management"
INJECTED_SESSION = "injected"


def injected_message() -> bytes:
    """Return an encoded message that a schedule-message request would enqueue."""
    message = Message(id="injected-1", group_id=INJECTED_SESSION, body=b"{}")
    message.annotations = {symbol("x-opt-scheduled-enqueue-time"): timestamp(0)}
    return message.encode()


REQUESTS = {
    "peek-message": {"from-sequence-number": 0, "message-count": 10},
    "get-message-sessions": {"skip": 0, "top": 100},
    "get-session-state": {"session-id": "order-1"},
    "schedule-message": {
        "messages": [
            {
                "message-id": "injected-1",
                "session-id": INJECTED_SESSION,
                "message": injected_message(),
            }
        ]
    },
}


def send(connection_string: str, session_id: str, body: str) -> None:
    with ServiceBusClient.from_connection_string(connection_string) as client:
        with client.get_queue_sender(QUEUE) as sender:
            sender.send_messages(ServiceBusMessage(body, session_id=session_id))


def stored_sessions(broker: RunningBroker) -> set[str | None]:
    return broker.call(
        lambda: {m.session_id for m in broker.state.stores[QUEUE].messages.values()}
    )


@pytest.mark.parametrize("operation", sorted(REQUESTS))
def test_management_without_token_is_rejected(
    local_broker: RunningBroker, operation: str
) -> None:
    send(local_broker.connection_string, "order-1", "secret body")
    # RawClient connects with SASL ANONYMOUS and never puts a token on $cbs.
    client = RawClient(local_broker.host, local_broker.port)
    try:
        replies = client.receiver(MANAGEMENT, None, session_filter=False)
        requests = client.sender(MANAGEMENT)
        message = management_request(operation, REQUESTS[operation])
        request = client.start_transfer(requests, message)
        client.pump_until(lambda: bool(request.remote_state))

        assert request.remote_state == Disposition.REJECTED
        assert request.remote.condition is not None
        assert request.remote.condition.name == UNAUTHORIZED
        assert replies.current is None
        assert replies.remote_condition is not None
        assert replies.remote_condition.name == UNAUTHORIZED
    finally:
        client.close_abruptly()
    assert stored_sessions(local_broker) == {"order-1"}


def test_management_with_token_still_works(local_broker: RunningBroker) -> None:
    send(local_broker.connection_string, "order-2", "visible body")
    with ServiceBusClient.from_connection_string(
        local_broker.connection_string
    ) as client:
        with client.get_queue_receiver(
            QUEUE, session_id="order-2", max_wait_time=1
        ) as receiver:
            peeked = receiver.peek_messages(max_message_count=5)
            receiver.session.set_state(b"checkpoint")
            state = receiver.session.get_state()
    assert [str(message) for message in peeked] == ["visible body"]
    assert state == b"checkpoint"
