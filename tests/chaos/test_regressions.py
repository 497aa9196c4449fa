"""Regression tests for faults the chaos runs found, with the smallest known input."""

from __future__ import annotations

import asyncio
from typing import Any

from consumer.app import ConsumerApp
from consumer.config import Settings
from consumer.events import EVENT_TYPES
from consumer.generate import generate_stream
from consumer.publish import publish_events
from consumer.routing import EventContext
from localbus.testing import run_broker

ENTITY = "orders.regression.events"


async def test_short_lock_consumer_keeps_progressing() -> None:
    events = [
        event
        for event in generate_stream(4, seed=3)
        if event["eventType"] in ("ORDER_CREATED", "CUSTOMER_NOTIFIED")
    ]
    handled: list[str] = []
    all_handled = asyncio.Event()

    async def slow_handler(event: Any, ctx: EventContext) -> None:
        await asyncio.sleep(0.5)
        handled.append(ctx.message_id)
        if len(handled) == len(events):
            all_handled.set()

    with run_broker(entities=[ENTITY], lock_duration_s=2.0) as broker:
        settings = Settings(
            connection_string=broker.connection_string,
            entity=ENTITY,
            max_concurrent_sessions=1,
            session_idle_timeout_s=0.2,
            accept_timeout_s=1.0,
            metrics_port=0,
        )
        await publish_events(settings, events)
        app = ConsumerApp(settings)
        for event_type in EVENT_TYPES:
            app.router.add_handler(event_type, slow_handler)
        running = asyncio.create_task(app.run())
        # The handlers need 0.5 s per message, 6 s in all, so 15 s is a wide margin.
        try:
            await asyncio.wait_for(all_handled.wait(), timeout=15)
        except TimeoutError:
            pass
        app.stop()
        await asyncio.wait_for(running, timeout=30)

    assert len(handled) == len(events)
