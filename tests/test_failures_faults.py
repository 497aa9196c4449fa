"""Lost locks, dropped connections, shutdown and outages against the local broker.

Faults are injected at the transport seam (`FaultyTransport`) or by the broker itself:
a short lock duration lets session locks expire, and a broker subprocess is killed
and restarted on the same port and data directory to drop every connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from consumer.app import ConsumerApp
from consumer.events import EVENT_TYPES
from consumer.processor import BrokerUnavailable
from consumer.routing import EventContext
from consumer.transport import InboundMessage, SessionReceiver
from localbus.testing import (
    BrokerProcess,
    RunningBroker,
    run_broker,
    run_broker_process,
)
from tests.conftest import (
    MAX_DELIVERY_COUNT,
    QUEUE,
    SDK_SOCKET_LEAKS,
    Recorder,
    collect_sdk_leaks,
    consume,
    dead_letters,
    faulty_transport,
    outgoing_event,
    publish,
    settings_for,
)
from tests.test_failures import one_order

pytestmark = SDK_SOCKET_LEAKS

# Short enough that a test waits little for a lock to expire, long enough that a
# loaded machine renews nothing by accident: renewal is off in these tests.
SHORT_LOCK_S = 1.0


@pytest.fixture
def short_lock_broker() -> Iterator[RunningBroker]:
    """A local broker whose session locks expire after `SHORT_LOCK_S`."""
    with run_broker(
        entities=[QUEUE],
        lock_duration_s=SHORT_LOCK_S,
        max_delivery_count=MAX_DELIVERY_COUNT,
    ) as running:
        yield running
    collect_sdk_leaks()


def three_messages() -> list[Any]:
    """Return the first three events of one order as messages m0, m1, m2."""
    events = one_order()[:3]
    return [outgoing_event(event, f"m{index}") for index, event in enumerate(events)]


def install(app: ConsumerApp, handler: Any) -> None:
    for event_type in EVENT_TYPES:
        app.router.add_handler(event_type, handler)


async def wait_until_expired(receiver: SessionReceiver) -> None:
    """Sleep until the session lock the broker reported has passed, plus a margin."""
    locked_until = receiver.locked_until
    assert locked_until is not None
    remaining_s = (locked_until - datetime.now(UTC)).total_seconds()
    await asyncio.sleep(max(remaining_s, 0.0) + 0.5)


async def test_lock_expiry_during_handler_settles_nothing(
    short_lock_broker: RunningBroker,
) -> None:
    messages = three_messages()
    await publish(short_lock_broker.connection_string, messages)
    settings = settings_for(
        short_lock_broker.connection_string, max_lock_renewal_s=0, retry_attempts=1
    )
    transport = faulty_transport(settings)
    app = ConsumerApp(settings, transport=transport)
    calls: list[tuple[str, int]] = []

    async def outlive_lock_once(event: Any, ctx: EventContext) -> None:
        calls.append((ctx.message_id, ctx.delivery_count))
        if ctx.message_id == "m1" and ctx.delivery_count == 0:
            await asyncio.sleep(SHORT_LOCK_S * 2)

    install(app, outlive_lock_once)

    with capture_logs() as logs:
        await consume(app, until_idle_s=SHORT_LOCK_S * 3)

    events = [entry["event"] for entry in logs]
    assert "handler_timeout_exceeds_lock_renewal" in events
    handled_ids = [message_id for message_id, _ in calls]
    assert handled_ids == ["m0", "m1", "m1", "m2"]
    # The first run of m1 finished after the lock expired: nothing was settled for
    # it, and the broker delivered m1 again with a higher delivery count.
    assert calls[2][1] > calls[1][1]
    assert transport.settled == [
        ("m0", "complete"),
        ("m1", "complete"),
        ("m2", "complete"),
    ]
    assert app.metrics.value("sessions_lost", entity=QUEUE) >= 1
    assert await dead_letters(short_lock_broker.connection_string) == []


async def test_checkpoint_skips_handlers_after_lock_expiry(
    short_lock_broker: RunningBroker,
) -> None:
    messages = three_messages()
    await publish(short_lock_broker.connection_string, messages)
    settings = settings_for(short_lock_broker.connection_string, max_lock_renewal_s=0)
    transport = faulty_transport(settings)
    delayed: list[str] = []

    async def expire_before_first_complete(
        receiver: SessionReceiver, message: InboundMessage
    ) -> None:
        # The handlers finished and the checkpoint is written; the lock expires
        # before the complete reaches the broker.
        if message.message_id == "m1" and not delayed:
            delayed.append(message.message_id)
            await wait_until_expired(receiver)

    transport.before_complete = expire_before_first_complete
    app = ConsumerApp(settings, transport=transport)
    recorder = Recorder()
    recorder.install(app)

    await consume(app, until_idle_s=SHORT_LOCK_S * 3)

    session_id = messages[0].session_id
    assert recorder.handled[session_id] == ["m0", "m1", "m2"]
    deliveries = [
        count for message_id, count in transport.received if message_id == "m1"
    ]
    assert len(deliveries) == 2
    assert deliveries[1] > deliveries[0]
    duplicates = app.metrics.value(
        "messages_duplicate", entity=QUEUE, event_type=messages[1].subject or ""
    )
    assert duplicates == 1
    assert await dead_letters(short_lock_broker.connection_string) == []


@pytest.fixture
def broker_process(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A `python -m localbus` subprocess that keeps its state in `tmp_path`."""
    with run_broker_process(
        entities=[QUEUE],
        lock_duration_s=5.0,
        max_delivery_count=MAX_DELIVERY_COUNT,
        data_dir=tmp_path / "broker",
    ) as running:
        yield running
    collect_sdk_leaks()


async def test_dropped_connection_before_complete(
    broker_process: BrokerProcess,
) -> None:
    messages = three_messages()
    await publish(broker_process.connection_string, messages)
    settings = settings_for(broker_process.connection_string)
    transport = faulty_transport(settings)
    restarts: list[str] = []

    async def restart_before_first_complete(
        receiver: SessionReceiver, message: InboundMessage
    ) -> None:
        if message.message_id == "m1" and not restarts:
            restarts.append(message.message_id)
            await asyncio.to_thread(broker_process.kill)
            await asyncio.to_thread(broker_process.start)

    transport.before_complete = restart_before_first_complete
    app = ConsumerApp(settings, transport=transport)
    recorder = Recorder()
    recorder.install(app)

    await consume(app, until_idle_s=2.0)

    assert restarts == ["m1"]
    assert recorder.handled[messages[0].session_id] == ["m0", "m1", "m2"]
    assert recorder.calls == 3
    assert await dead_letters(broker_process.connection_string) == []


async def test_short_grace_abandons_in_flight(broker: Any) -> None:
    messages = three_messages()
    await publish(broker.connection_string, messages)
    settings = settings_for(broker.connection_string, shutdown_grace_s=0.2)
    app = ConsumerApp(settings)
    started = asyncio.Event()
    finished: list[str] = []
    cancelled: list[str] = []

    async def hang(event: Any, ctx: EventContext) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(ctx.message_id)
            raise
        finished.append(ctx.message_id)

    install(app, hang)
    run = asyncio.create_task(app.run())
    await asyncio.wait_for(started.wait(), timeout=20)
    app.stop()
    await asyncio.wait_for(run, timeout=20)

    assert cancelled == ["m0"]
    assert finished == []
    subject = messages[0].subject or ""
    labels = {"entity": QUEUE, "event_type": subject}
    assert app.metrics.value("messages_abandoned", **labels) == 1
    assert app.metrics.value("messages_completed", **labels) == 0

    # The abandoned message comes back first, with a higher delivery count.
    again = ConsumerApp(settings)
    deliveries: list[tuple[str, int]] = []

    async def record(event: Any, ctx: EventContext) -> None:
        deliveries.append((ctx.message_id, ctx.delivery_count))

    install(again, record)
    await consume(again)

    assert [message_id for message_id, _ in deliveries] == ["m0", "m1", "m2"]
    assert deliveries[0][1] >= 1


async def test_outage_turns_unready_and_stops(broker: Any) -> None:
    connection_string = broker.connection_string
    broker.stop()
    settings = settings_for(
        connection_string,
        max_disconnected_s=2.0,
        max_concurrent_sessions=1,
        standby_sessions=0,
        transport_retry_attempts=0,
    )
    transport = faulty_transport(settings)
    app = ConsumerApp(settings, transport=transport)

    with capture_logs() as logs:
        run = asyncio.create_task(app.run())
        while transport.accepts < 2 and not run.done():
            await asyncio.sleep(0.05)
        ready_during_outage = app.health.ready()
        with pytest.raises(BrokerUnavailable, match="max_disconnected_s=2.0"):
            await asyncio.wait_for(run, timeout=60)

    # A refused connection fails in milliseconds, so without the backoff between
    # accepts (0.5 s, then doubling) there would be hundreds of attempts.
    assert 2 <= transport.accepts <= 10
    assert not ready_during_outage
    assert not app.health.ready()
    assert app.health.readiness_body()["connected"] is False
    # Every failed accept is counted, but the error is logged at a bounded rate.
    lost = [entry for entry in logs if entry["event"] == "connection_lost"]
    assert 1 <= len(lost) < transport.accepts
