"""Framework overhead floor: our consumer on in-memory sessions against a bare loop.

Both run in this process, without a broker, over the same message bodies. Our side is
a real `ConsumerApp` and `SessionProcessor` on `consumer.transport.memory`, the
transport behind `consumer.testing.ConsumerTestHarness`, so the figure is the cost of
parsing, dispatch, checkpointing, settlement, metrics and logging. The bare loop does
only the same validation (`parse_event`), the same no-op handler call, one counter
increment and one log line per message. Both log through the same structlog setup at
debug level into /dev/null, so each pays for rendering its lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter

from bench.measures.common import ratio
from bench.recorder import Recorder, TimingTransport
from bench.workload import event_type_at
from consumer.config import Settings, local_connection_string
from consumer.events import EVENT_TYPES, parse_event
from consumer.logs import configure_logging
from consumer.routing import Router
from consumer.testing import make_event
from consumer.transport.memory import MemoryBroker, MemoryTransport

CONCURRENCY = 8
# Each side runs this often, and the fastest run counts as the floor.
REPEATS = 3
# The idle timeouts only matter once the last session is empty.
MEMORY_SETTINGS: dict[str, Any] = {
    "session_idle_timeout_s": 0.05,
    "accept_timeout_s": 0.05,
    "max_concurrent_sessions": CONCURRENCY,
}


def _bodies(orders: int, events: int) -> list[tuple[str, bytes]]:
    import json

    bodies = []
    for index in range(events):
        for number in range(orders):
            order_id = f"overhead-{number}"
            event = make_event(event_type_at(index), order_id)
            bodies.append((order_id, json.dumps(event).encode("utf-8")))
    return bodies


async def _noop(event: Any, ctx: Any = None) -> None:
    return None


async def _run_ours(bodies: list[tuple[str, bytes]]) -> float:
    from consumer.app import ConsumerApp

    broker = MemoryBroker("bench.overhead")
    for number, (order_id, body) in enumerate(bodies):
        await broker.send(body, session_id=order_id, message_id=f"m-{number}")
    recorder = Recorder(len(bodies))
    settings = Settings(connection_string=local_connection_string(), **MEMORY_SETTINGS)
    transport = TimingTransport(MemoryTransport(broker), recorder)
    app = ConsumerApp(settings, registry=CollectorRegistry(), transport=transport)
    router = Router()
    for event_type in EVENT_TYPES:
        router.handler(event_type)(_noop)
    app.include_router(router)
    started = time.perf_counter()
    task = asyncio.create_task(app.run())
    await recorder.done.wait()
    elapsed_s = (recorder.finished_at or time.perf_counter()) - started
    app.stop()
    await task
    return elapsed_s


async def _run_bare(bodies: list[tuple[str, bytes]]) -> float:
    counter = Counter(
        "bare_messages_total",
        "Messages handled by the bare loop.",
        ("entity", "event_type"),
        registry=CollectorRegistry(),
    )
    log = structlog.get_logger("bench.bare")
    started = time.perf_counter()
    for order_id, body in bodies:
        event = parse_event(body)
        await _noop(event)
        counter.labels("bench.overhead", event.event_type).inc()
        log.debug("message_handled", order_id=order_id, event_type=event.event_type)
    return time.perf_counter() - started


@contextmanager
def _logging_to_null() -> Iterator[None]:
    """Log at debug level into /dev/null, then restore structlog and the root logger."""
    previous = structlog.get_config()
    root = logging.getLogger()
    azure = logging.getLogger("azure")
    handlers, level, azure_level = list(root.handlers), root.level, azure.level
    with open(os.devnull, "w") as sink:
        configure_logging("json", "debug", stream=sink)
        try:
            yield
        finally:
            structlog.configure(**previous)
            root.handlers[:] = handlers
            root.setLevel(level)
            azure.setLevel(azure_level)


async def measure_overhead(orders: int, events: int) -> dict[str, Any]:
    """Measure microseconds per message for ours and the bare loop, and their ratio."""
    bodies = _bodies(orders, events)
    with _logging_to_null():
        ours_s = min([await _run_ours(bodies) for _ in range(REPEATS)])
        bare_s = min([await _run_bare(bodies) for _ in range(REPEATS)])
    ours_us = ours_s / len(bodies) * 1e6
    bare_us = bare_s / len(bodies) * 1e6
    return {
        "messages": len(bodies),
        "concurrency": CONCURRENCY,
        "ours_us_per_message": ours_us,
        "bare_us_per_message": bare_us,
        "ratio": ratio(ours_us, bare_us),
    }
