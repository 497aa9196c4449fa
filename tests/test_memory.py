"""Memory per session: what `AzureTransport` keeps after many sessions were closed.

Every SDK session receiver opens its own AMQP connection, and azure-servicebus
7.15.0 leaves each closed connection in reference cycles that only the cyclic
garbage collector frees. These tests count the objects that matter instead of
RSS, which is too noisy for a unit test.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from consumer.transport.azure import AzureSessionReceiver, AzureTransport
from tests.conftest import (
    SDK_SOCKET_LEAKS,
    Outgoing,
    collect_sdk_leaks,
    publish,
    settings_for,
)

SESSIONS = 150
# Receivers open at once, so the sessions take a few rounds of accept and close.
CONCURRENCY = 10
ACCEPT_WAIT_S = 2.0
RECEIVE_WAIT_S = 2.0
ATTACH_LOGGER = "azure.servicebus._pyamqp.aio._link_async"

pytestmark = [SDK_SOCKET_LEAKS, pytest.mark.slow]


@pytest.fixture
def collector_paused() -> Iterator[None]:
    """Pause automatic garbage collection, so cyclic garbage stays countable."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        collect_sdk_leaks()


def live_objects(kind: type[Any]) -> list[Any]:
    """Return the gc-tracked instances of `kind`, uncollected garbage included."""
    return [item for item in gc.get_objects() if isinstance(item, kind)]


def sdk_connections() -> list[Any]:
    """Return the gc-tracked AMQP connections of the SDK's async transport."""
    from azure.servicebus._pyamqp.aio._connection_async import Connection

    return live_objects(Connection)


async def drain_sessions(transport: AzureTransport, closed: list[str]) -> None:
    """Accept, receive, complete and close sessions until none is left to accept."""
    while True:
        receiver = await transport.accept_session(ACCEPT_WAIT_S)
        if receiver is None:
            return
        try:
            message = await receiver.receive(RECEIVE_WAIT_S)
            if message is not None:
                await receiver.complete(message)
        finally:
            await receiver.close()
        closed.append(receiver.session_id)


async def open_and_close_sessions(transport: AzureTransport) -> list[str]:
    """Drain `SESSIONS` single-message sessions and return the closed session ids."""
    closed: list[str] = []
    workers = [drain_sessions(transport, closed) for _ in range(CONCURRENCY)]
    await asyncio.gather(*workers)
    return closed


async def test_closed_sessions_release_their_memory(
    broker: Any, collector_paused: None, caplog: pytest.LogCaptureFixture
) -> None:
    # The SDK logs a timed-out accept as a warning whose argument is the exception,
    # and pytest keeps that record until the test ends. The exception's traceback
    # references the receiver and its connection, so the warning is dropped here.
    caplog.set_level(logging.ERROR, logger=ATTACH_LOGGER)
    messages = [
        Outgoing(body=b"{}", session_id=f"order-{number}", message_id=f"m{number}")
        for number in range(SESSIONS)
    ]
    await publish(broker.connection_string, messages)
    transport = AzureTransport(settings_for(broker.connection_string))
    contexts_before = {id(context) for context in live_objects(ssl.SSLContext)}
    try:
        closed = await open_and_close_sessions(transport)
        new_contexts = [
            context
            for context in live_objects(ssl.SSLContext)
            if id(context) not in contexts_before
        ]
        garbage_connections = len(sdk_connections())
    finally:
        await transport.close()
    gc.collect()
    connections = sdk_connections()
    receivers = live_objects(AzureSessionReceiver)

    assert len(set(closed)) == SESSIONS
    # Without a shared context the SDK builds one per connection (about 0.7 MB of
    # OpenSSL memory each), and with the collector paused every one of them stays.
    assert new_contexts == []
    # Each closed connection stays in reference cycles until a collection runs.
    assert garbage_connections >= SESSIONS
    # Nothing references a closed session's connection or receiver once collected.
    assert connections == []
    assert receivers == []
