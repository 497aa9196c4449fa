"""A message that kills its consumer on every delivery parks its order.

The broker dead-letters such a message by itself once its last allowed delivery fails,
as `MaxDeliveryCountExceeded`, and notifies no consumer. Before the consumer recorded a
park ahead of each last delivery, the next consumer of the session ran the order's
later messages past the lost one. Each consumer here is a process of its own, so a
crash is a real exit in the middle of a handler.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from consumer.checkpoint import SessionCheckpoint
from consumer.config import Settings
from consumer.publish import build_message, publish_messages
from consumer.testing import make_event
from localbus.testing import run_broker
from tests.conftest import consumer_environment

ENTITY = "orders.crashloop.events"
ORDER_ID = "ORD-CRASH-1"
MAX_DELIVERY_COUNT = 2

CONSUMER_SCRIPT = """
import asyncio
import os
import sys

from consumer import ConsumerApp, load_settings
from consumer.events import EVENT_TYPES

crash_on = os.environ.get("CRASH_ON_MESSAGE_ID", "")
handled_path = sys.argv[1]
app = ConsumerApp(
    load_settings(
        "dev",
        entity=sys.argv[2],
        max_delivery_count=int(sys.argv[3]),
        session_idle_timeout_s=0.5,
        accept_timeout_s=1.0,
        metrics_port=0,
    )
)


async def record(event, ctx) -> None:
    if ctx.message_id == crash_on:
        # A crash in the handler: no settlement, no state write, no clean close.
        os._exit(3)
    with open(handled_path, "a", encoding="utf-8") as handled:
        handled.write(ctx.message_id + "\\n")


for event_type in EVENT_TYPES:
    app.router.add_handler(event_type, record)
asyncio.run(app.run(until_idle_s=3.0))
"""


def _run_consumer(
    connection_string: str, handled_path: Path, crash_on: str = ""
) -> subprocess.CompletedProcess[str]:
    environment = consumer_environment({"connection_string": connection_string})
    environment["CRASH_ON_MESSAGE_ID"] = crash_on
    return subprocess.run(
        [
            sys.executable,
            "-c",
            CONSUMER_SCRIPT,
            str(handled_path),
            ENTITY,
            str(MAX_DELIVERY_COUNT),
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


async def _session_state(settings: Settings) -> SessionCheckpoint:
    from azure.servicebus.aio import ServiceBusClient

    assert settings.connection_string is not None
    client = ServiceBusClient.from_connection_string(
        settings.connection_string.get_secret_value()
    )
    async with client:
        receiver = client.get_queue_receiver(ENTITY, session_id=ORDER_ID)
        async with receiver:
            return SessionCheckpoint.decode(await receiver.session.get_state())


async def test_crashing_message_parks_its_order(tmp_path: Path) -> None:
    handled_path = tmp_path / "handled.txt"
    events = [
        make_event("ORDER_CREATED", ORDER_ID),
        make_event("ORDER_UPDATED", ORDER_ID),
        make_event("ORDER_UPDATED", ORDER_ID),
    ]
    message_ids = ["crash-first", "crash-poison", "crash-after"]
    with run_broker(
        entities=[ENTITY], lock_duration_s=5.0, max_delivery_count=MAX_DELIVERY_COUNT
    ) as broker:
        settings = Settings(
            connection_string=broker.connection_string,
            entity=ENTITY,
            metrics_port=0,
        )
        messages = [
            build_message(event, message_id=message_id)
            for event, message_id in zip(events, message_ids, strict=True)
        ]
        await publish_messages(settings, messages)

        # Every allowed delivery of the poison message kills its consumer.
        for _ in range(MAX_DELIVERY_COUNT):
            crashed = await asyncio.to_thread(
                _run_consumer, broker.connection_string, handled_path, "crash-poison"
            )
            assert crashed.returncode == 3, crashed.stderr[-2000:]
        finished = await asyncio.to_thread(
            _run_consumer, broker.connection_string, handled_path
        )
        assert finished.returncode == 0, finished.stderr[-2000:]
        checkpoint = await _session_state(settings)

    handled = handled_path.read_text(encoding="utf-8").split()
    assert handled == ["crash-first"]
    assert checkpoint.parked is not None
    assert checkpoint.parked.message_id == "crash-poison"
    assert checkpoint.parked.reason == "MaxDeliveryCountExceeded"
    assert len(checkpoint.deferred_sequence_numbers) == 1
