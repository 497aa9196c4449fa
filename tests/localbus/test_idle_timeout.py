"""The advertised AMQP idle-time-out: silent connections close, idle SDK ones stay."""

from __future__ import annotations

import asyncio
import threading

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient as AsyncServiceBusClient

from localbus.testing import RunningBroker
from tests.localbus.conftest import QUEUE
from tests.localbus.rawclient import RawClient

# The broker advertises this idle-time-out and closes a connection that sends
# nothing for twice as long.
IDLE_TIMEOUT_S = 0.5
# An SDK receiver waits for a message that another client sends this late, long
# after a silent connection would have been closed.
SEND_AFTER_S = 3.0
RECEIVE_WAIT_S = 10

pytestmark = pytest.mark.local_broker(entities=[QUEUE], idle_timeout_s=IDLE_TIMEOUT_S)


def idle_timeouts(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if "idle-timeout" in record.getMessage()
    ]


def test_broker_advertises_idle_timeout(local_broker: RunningBroker) -> None:
    client = RawClient(local_broker.host, local_broker.port)
    client.pump_until(lambda: bool(client.connection.remote_container is not None))
    assert client.transport.remote_idle_timeout == IDLE_TIMEOUT_S
    client.close_abruptly()


def test_silent_connection_is_closed(
    local_broker: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    client = RawClient(local_broker.host, local_broker.port)
    client.pump_until(lambda: bool(client.connection.remote_container is not None))
    # The raw client never calls `tick`, so it sends no empty frames.
    with pytest.raises(ConnectionError):
        client.pump_until(lambda: False, timeout_s=30)
    client.close_abruptly()
    assert idle_timeouts(caplog)


def test_idle_sdk_receiver_stays_connected(
    local_broker: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    def send_late() -> None:
        with ServiceBusClient.from_connection_string(
            local_broker.connection_string
        ) as other:
            with other.get_queue_sender(QUEUE) as sender:
                sender.send_messages(ServiceBusMessage("late", session_id="idle"))

    with ServiceBusClient.from_connection_string(local_broker.connection_string) as sdk:
        with sdk.get_queue_receiver(QUEUE, session_id="idle", max_wait_time=1) as r:
            # The receiver is open and silent when the timer starts.
            sender = threading.Timer(SEND_AFTER_S, send_late)
            sender.start()
            received = r.receive_messages(max_wait_time=RECEIVE_WAIT_S)
            sender.join()
            for message in received:
                r.complete_message(message)
    assert [str(message) for message in received] == ["late"]
    assert idle_timeouts(caplog) == []


async def test_idle_aio_receiver_stays_connected(
    local_broker: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    async with AsyncServiceBusClient.from_connection_string(
        local_broker.connection_string
    ) as sdk:

        async def send_late() -> None:
            await asyncio.sleep(SEND_AFTER_S)
            async with sdk.get_queue_sender(QUEUE) as sender:
                await sender.send_messages(ServiceBusMessage("late", session_id="idle"))

        async with sdk.get_queue_receiver(
            QUEUE, session_id="idle", max_wait_time=1
        ) as receiver:
            sending = asyncio.create_task(send_late())
            received = await receiver.receive_messages(max_wait_time=RECEIVE_WAIT_S)
            await sending
            for message in received:
                await receiver.complete_message(message)
    assert [str(message) for message in received] == ["late"]
    assert idle_timeouts(caplog) == []
