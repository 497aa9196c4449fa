"""The Azure transport on shutdown: cancelled accepts and the client close.

A stop cancels the accepts in flight, which must release any session they locked.

`ServiceBusClient.close()` of azure-servicebus 7.15.0 iterates a WeakSet of the
receivers it created and awaits each close. A receiver created meanwhile, which also
commits the removals of receivers garbage-collected during the iteration, changes the
set and fails the iteration with `RuntimeError: Set changed size during iteration`.
The tests below make that happen against the local broker.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from azure.servicebus import NEXT_AVAILABLE_SESSION
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver

from consumer.generate import generate_stream
from consumer.transport.azure import AzureSessionReceiver, AzureTransport
from tests.conftest import (
    QUEUE,
    SDK_SOCKET_LEAKS,
    numbered,
    publish,
    settings_for,
)

pytestmark = SDK_SOCKET_LEAKS

SESSIONS = 3


def change_handlers_on_first_close(
    client: ServiceBusClient, receivers: list[ServiceBusReceiver]
) -> list[ServiceBusReceiver]:
    """Make the first receiver close change the client's set of receivers.

    Before that close, two receivers that were never opened are dropped and
    collected, and a new one is created. Return the list holding the new one.
    """
    spare = [
        client.get_queue_receiver(QUEUE, session_id=NEXT_AVAILABLE_SESSION)
        for _ in range(2)
    ]
    created: list[ServiceBusReceiver] = []

    def patched(close: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        async def close_after_change() -> None:
            if not created:
                spare.clear()
                gc.collect()
                created.append(
                    client.get_queue_receiver(QUEUE, session_id=NEXT_AVAILABLE_SESSION)
                )
            await close()

        return close_after_change

    for receiver in receivers:
        receiver.close = patched(receiver.close)  # type: ignore[method-assign]
    return created


async def accept_sessions(transport: AzureTransport) -> list[AzureSessionReceiver]:
    accepted = []
    for _ in range(SESSIONS):
        receiver = await transport.accept_session(5.0)
        assert receiver is not None
        accepted.append(receiver)
    return accepted


def sdk_receiver(receiver: AzureSessionReceiver) -> ServiceBusReceiver:
    return receiver._receiver


def locked_sessions(broker: Any) -> list[str]:
    """Return the ids of the sessions of `QUEUE` that a receiver holds."""

    def read() -> list[str]:
        sessions = broker.state.store_for(QUEUE).sessions
        return [name for name, session in sessions.items() if session.holder]

    return list(broker.call(read))


async def wait_for_unlocked(broker: Any, timeout_s: float = 10.0) -> list[str]:
    """Poll the broker until no session is locked; return those still locked."""
    deadline = time.monotonic() + timeout_s
    locked = locked_sessions(broker)
    while locked and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        locked = locked_sessions(broker)
    return locked


async def publish_sessions(connection_string: str) -> None:
    messages = numbered(generate_stream(SESSIONS, seed=4))
    await publish(connection_string, messages)


async def test_sdk_close_fails_when_handlers_change(broker: Any) -> None:
    await publish_sessions(broker.connection_string)
    transport = AzureTransport(settings_for(broker.connection_string))
    accepted = await accept_sessions(transport)
    client = transport._client
    created = change_handlers_on_first_close(
        client, [sdk_receiver(receiver) for receiver in accepted]
    )

    with pytest.raises(RuntimeError, match="Set changed size during iteration"):
        await client.close()

    assert len(created) == 1
    await transport.close()


async def test_transport_close_survives_handler_change(broker: Any) -> None:
    await publish_sessions(broker.connection_string)
    transport = AzureTransport(settings_for(broker.connection_string))
    accepted = await accept_sessions(transport)
    receivers = [sdk_receiver(receiver) for receiver in accepted]
    created = change_handlers_on_first_close(transport._client, receivers)

    await transport.close()

    assert len(created) == 1
    assert [receiver._running for receiver in receivers] == [False] * SESSIONS
    assert [receiver._handler for receiver in receivers] == [None] * SESSIONS
    assert await wait_for_unlocked(broker) == []


# Delays before the cancel: before the link is attached, while the broker grants the
# session, and after the SDK reported the link open.
CANCEL_AFTER_S = [0.0, 0.01, 0.05, 0.2, 0.4]


async def test_cancelled_accept_leaves_no_session_locked(broker: Any) -> None:
    await publish_sessions(broker.connection_string)
    transport = AzureTransport(settings_for(broker.connection_string))
    finished: list[str] = []

    for delay_s in CANCEL_AFTER_S:
        accept = asyncio.create_task(transport.accept_session(5.0))
        await asyncio.sleep(delay_s)
        accept.cancel()
        try:
            receiver = await accept
        except asyncio.CancelledError:
            pass
        else:
            # The accept ended before the cancel landed, so its session is ours.
            assert receiver is not None
            finished.append(receiver.session_id)
            await receiver.close()
        assert await wait_for_unlocked(broker) == [], f"cancelled after {delay_s}s"

    accepted = await accept_sessions(transport)
    await transport.close()

    assert len({receiver.session_id for receiver in accepted}) == SESSIONS
    assert len(finished) < len(CANCEL_AFTER_S)
