"""`orders-consumer demo`: the whole product end to end on one machine.

The demo starts the local broker in-process on a free 127.0.0.1 port and publishes a
generated stream. It consumes the stream with the bundled handlers into a store in a
temporary folder, then checks that every event was handled, each order's events in
publish order, and nothing was dead-lettered.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consumer.config import Settings
from consumer.events import EVENT_TYPES
from consumer.routing import EventContext

ENTITY = "orders.demo.events"
OUTCOMES = ("completed", "duplicate", "abandoned", "dead_lettered")


@dataclass
class OrderTracker:
    """Records the events each order's handlers finished, in handling order."""

    handled: dict[str, list[tuple[str, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    last_handled_at: float = 0.0

    async def __call__(self, event: Any, ctx: EventContext) -> None:
        self.handled[ctx.order_id].append((event.event_type, _timestamp(event)))
        self.last_handled_at = time.monotonic()


def _timestamp(event: Any) -> str:
    return event.timestamp.isoformat()


def _published_order(events: list[dict[str, Any]]) -> dict[str, list[tuple[str, str]]]:
    from consumer.events import validate_event

    expected: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for raw in events:
        event = validate_event(raw)
        expected[event.order_id].append((event.event_type, _timestamp(event)))
    return expected


@dataclass(frozen=True)
class DemoReport:
    """Summary of a demo run, compared with what was published."""

    orders: int
    published: int
    by_type_and_outcome: dict[tuple[str, str], int]
    statuses: dict[str, int]
    ordering_errors: tuple[str, ...]
    dead_lettered: int
    elapsed_s: float

    @property
    def handled(self) -> int:
        """Messages completed after their handlers ran."""
        return sum(
            count
            for (_, outcome), count in self.by_type_and_outcome.items()
            if outcome == "completed"
        )

    @property
    def ok(self) -> bool:
        """Whether every event was handled once, in order, with no dead-letter."""
        return (
            not self.ordering_errors
            and self.dead_lettered == 0
            and self.handled == self.published
        )

    def render(self) -> str:
        """Return the summary printed by the command."""
        lines = [
            f"orders: {self.orders}  events published: {self.published}  "
            f"handled: {self.handled}  dead-lettered: {self.dead_lettered}",
            "",
            "messages by type and outcome:",
        ]
        for event_type in sorted({key[0] for key in self.by_type_and_outcome}):
            counts = "  ".join(
                f"{outcome}={self.by_type_and_outcome.get((event_type, outcome), 0)}"
                for outcome in OUTCOMES
            )
            lines.append(f"  {event_type:<20} {counts}")
        lines += ["", "orders by final status:"]
        for status, count in sorted(self.statuses.items()):
            lines.append(f"  {status:<20} {count}")
        lines.append("")
        if self.ordering_errors:
            lines.append(f"ordering: FAILED for {len(self.ordering_errors)} orders")
            lines += [f"  {error}" for error in self.ordering_errors[:10]]
        else:
            lines.append("ordering: every order handled in publish order")
        rate = self.published / self.elapsed_s if self.elapsed_s else 0.0
        lines.append(
            f"throughput: {self.published} events in {self.elapsed_s:.2f} s "
            f"({rate:.0f} events/s from first receive to last handled event)"
        )
        lines.append("result: OK" if self.ok else "result: FAILED")
        return "\n".join(lines)


def _ordering_errors(
    expected: dict[str, list[tuple[str, str]]],
    handled: dict[str, list[tuple[str, str]]],
) -> tuple[str, ...]:
    errors = []
    for order_id in sorted(set(expected) | set(handled)):
        want = [event_type for event_type, _ in expected.get(order_id, [])]
        got = [event_type for event_type, _ in handled.get(order_id, [])]
        if expected.get(order_id) != handled.get(order_id):
            errors.append(f"{order_id}: published {want}, handled {got}")
    return tuple(errors)


def _outcome_counts(app: Any) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for labels in _dead_letter_labels(app):
        key = (labels["event_type"], "dead_lettered")
        value = int(app.metrics.value("messages_dead_lettered", **labels))
        counts[key] = counts.get(key, 0) + value
    for event_type in EVENT_TYPES:
        labels = {"entity": ENTITY, "event_type": event_type}
        for outcome in ("completed", "duplicate", "abandoned"):
            value = int(app.metrics.value(f"messages_{outcome}", **labels))
            if value:
                counts[(event_type, outcome)] = value
    return counts


async def run_demo(
    orders: int = 300, seed: int = 7, concurrency: int = 16
) -> DemoReport:
    """Run the demo with `orders` generated orders and return its report."""
    from consumer.generate import generate_stream
    from consumer.logs import configure_logging
    from localbus.testing import run_broker

    configure_logging("console", "warning")
    # The broker thread and the SDK log every connection torn down at exit; the demo
    # reports its own failures in the summary.
    logging.getLogger("localbus").setLevel(logging.ERROR)
    logging.getLogger("azure").setLevel(logging.ERROR)
    logging.getLogger("proton").setLevel(logging.CRITICAL)
    events = generate_stream(orders, seed)
    with tempfile.TemporaryDirectory(prefix="orders-demo-") as folder:
        with run_broker(entities=[ENTITY]) as broker:
            settings = _demo_settings(broker.connection_string, concurrency, folder)
            return await _publish_and_consume(settings, events, orders)


def _demo_settings(connection_string: str, concurrency: int, folder: str) -> Settings:
    return Settings(
        env="dev",
        connection_string=connection_string,
        entity=ENTITY,
        max_concurrent_sessions=concurrency,
        session_idle_timeout_s=0.1,
        accept_timeout_s=0.5,
        store_path=str(Path(folder) / "orders.sqlite3"),
        metrics_port=0,
    )


async def _publish_and_consume(
    settings: Settings, events: list[dict[str, Any]], orders: int
) -> DemoReport:
    import handlers
    from consumer.app import ConsumerApp
    from consumer.publish import publish_events

    await publish_events(settings, events)
    app = ConsumerApp(settings)
    store = handlers.install(app)
    tracker = OrderTracker()
    for event_type in EVENT_TYPES:
        app.router.add_handler(event_type, tracker)
    started = time.monotonic()
    try:
        await app.run(until_idle_s=1.0)
        # From the start of consuming to the last handled event, without the idle
        # wait that ends batch mode.
        elapsed_s = max(tracker.last_handled_at - started, 0.0)
        statuses = Counter(str(item.status) for item in store.all().values())
    finally:
        store.close()
    counts = _outcome_counts(app)
    dead = sum(
        int(app.metrics.value("messages_dead_lettered", **labels))
        for labels in _dead_letter_labels(app)
    )
    return DemoReport(
        orders=orders,
        published=len(events),
        by_type_and_outcome=counts,
        statuses=dict(statuses),
        ordering_errors=_ordering_errors(_published_order(events), tracker.handled),
        dead_lettered=dead,
        elapsed_s=elapsed_s,
    )


def _dead_letter_labels(app: Any) -> list[dict[str, str]]:
    labels = []
    for metric in app.metrics.messages_dead_lettered.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                labels.append(dict(sample.labels))
    return labels
