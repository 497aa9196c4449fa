"""Broken clients: malformed bytes and disconnects in the middle of an exchange."""

from __future__ import annotations

import socket
import time

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from proton import Message

from localbus.testing import RunningBroker
from tests.localbus.conftest import QUEUE
from tests.localbus.rawclient import RawClient, management_request

pytestmark = pytest.mark.local_broker(entities=[QUEUE], lock_duration_s=5)


def broker_still_serves(broker: RunningBroker, session_id: str) -> None:
    """Send and receive one message with the SDK."""
    with ServiceBusClient.from_connection_string(broker.connection_string) as sdk:
        with sdk.get_queue_sender(QUEUE) as sender:
            sender.send_messages(ServiceBusMessage("ok", session_id=session_id))
        with sdk.get_queue_receiver(QUEUE, session_id=session_id, max_wait_time=1) as r:
            (message,) = r.receive_messages(max_wait_time=1)
            r.complete_message(message)


def wait_until(condition, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTP/1.1 GET /\r\n\r\n",
        b"AMQP\x00\x01\x00\x00" + b"\xff" * 64,
        b"AMQP\x03\x01\x00\x00\x00\x00\x00\x0c\x02\x01\x00\x00\xde\xad\xbe\xef",
    ],
)
def test_malformed_bytes_close_only_that_connection(
    local_broker: RunningBroker, garbage: bytes
) -> None:
    with socket.create_connection((local_broker.host, local_broker.port)) as raw:
        raw.sendall(garbage)
        raw.settimeout(5)
        while raw.recv(4096):
            pass
    broker_still_serves(local_broker, "after-garbage")


def test_disconnect_mid_transfer_stores_nothing(local_broker: RunningBroker) -> None:
    client = RawClient(local_broker.host, local_broker.port)
    link = client.sender(QUEUE)
    client.start_transfer(link, Message(body=b"x" * 100_000, group_id="partial"))
    client.flush(limit=40_000)
    client.close_abruptly()
    broker_still_serves(local_broker, "after-transfer")
    stored = local_broker.call(lambda: local_broker.state.stores[QUEUE].sessions)
    assert "partial" not in stored


def test_disconnect_mid_settlement_releases_session(
    local_broker: RunningBroker,
) -> None:
    with ServiceBusClient.from_connection_string(local_broker.connection_string) as sdk:
        with sdk.get_queue_sender(QUEUE) as sender:
            sender.send_messages(ServiceBusMessage("held", session_id="s-cut"))
    client = RawClient(local_broker.host, local_broker.port)
    link = client.receiver(QUEUE, "s-cut")
    client.pump_until(lambda: link.current is not None and not link.current.partial)
    delivery = link.current
    delivery.update(delivery.ACCEPTED)
    client.close_abruptly()

    def released() -> bool:
        session = local_broker.state.stores[QUEUE].sessions.get("s-cut")
        return session is None or session.holder is None

    started = time.monotonic()
    wait_until(lambda: local_broker.call(released))
    assert time.monotonic() - started < 5
    with ServiceBusClient.from_connection_string(local_broker.connection_string) as sdk:
        with sdk.get_queue_receiver(QUEUE, session_id="s-cut", max_wait_time=1) as r:
            (again,) = r.receive_messages(max_wait_time=1)
            assert str(again) == "held"
            assert again.delivery_count == 1
            r.complete_message(again)


def test_disconnect_mid_management_request(local_broker: RunningBroker) -> None:
    client = RawClient(local_broker.host, local_broker.port)
    link = client.sender(f"{QUEUE}/$management")
    request = management_request("peek-message", {"from-sequence-number": 0})
    client.start_transfer(link, request)
    client.flush()
    client.close_abruptly()
    broker_still_serves(local_broker, "after-management")
