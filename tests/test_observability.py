"""Metrics and JSON logs after a real run against the local broker.

One order is dead-lettered by its handler and parked, one message has a body that is not
JSON, and the rest complete. The scraped `/metrics` values and the log lines must match
exactly what happened.
"""

from __future__ import annotations

import io
import json
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumer.app import ConsumerApp
from consumer.errors import DeadLetter
from consumer.generate import generate_stream
from consumer.http import OpsServer
from consumer.logs import configure_logging
from consumer.publish import publish_events, publish_raw
from consumer.routing import EventContext
from tests.conftest import (
    SDK_SOCKET_LEAKS,
    Outgoing,
    consume,
    numbered,
    settings_for,
)

pytestmark = [SDK_SOCKET_LEAKS]
ENTITY = "orders.test.events"
MESSAGE_IDS = ("order_id", "message_id", "correlation_id", "event_type")
MESSAGE_NUMBERS = ("delivery_count", "sequence_number")


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    yield stream
    configure_logging("console", "warning", stream=sys.stderr)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode("utf-8")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    expected_labels = set(labels.items())
    return sum(
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and expected_labels <= set(sample_labels)
    )


async def run_with_one_poison_order(
    connection_string: str,
) -> tuple[list[Outgoing], str, dict[Any, float]]:
    events = generate_stream(12, seed=5)
    stream = numbered(events)
    poison_order = stream[0].session_id
    settings = settings_for(connection_string, poison_policy="park")
    # The publisher sets the correlation id from metadata, as producers should.
    await publish_events(settings, events)
    await publish_raw(settings, [("ORD-GARBAGE", b"{not json")])

    app = ConsumerApp(settings)

    async def reject_poison_order(event: Any, ctx: EventContext) -> None:
        if ctx.order_id == poison_order:
            raise DeadLetter("FraudSuspected", "customer is on the block list")

    for event_type in ("ORDER_CREATED",):
        app.router.add_handler(event_type, reject_poison_order)
    for event_type in set(app.router.event_types) ^ set(_all_event_types()):
        app.router.add_handler(event_type, _accept)

    server = OpsServer(app.metrics.registry, app.health, "127.0.0.1", 0)
    server.start()
    try:
        await consume(app, until_idle_s=1.0)
        samples = scrape(server.url)
    finally:
        server.stop()
    return stream, poison_order, samples


def _all_event_types() -> list[str]:
    from consumer.events import EVENT_TYPES

    return list(EVENT_TYPES)


async def _accept(event: Any, ctx: EventContext) -> None:
    ctx.log.debug("handled_in_test")


async def test_metrics_match_outcomes(broker: Any, json_logs: io.StringIO) -> None:
    stream, poison_order, samples = await run_with_one_poison_order(
        broker.connection_string
    )

    poison_count = sum(1 for message in stream if message.session_id == poison_order)
    healthy = len(stream) - poison_count
    prefix = "orders_consumer_"
    assert total(samples, prefix + "messages_completed_total") == healthy
    assert (
        total(samples, prefix + "messages_dead_lettered_total", reason="FraudSuspected")
        == 1
    )
    assert (
        total(samples, prefix + "messages_dead_lettered_total", reason="MalformedBody")
        == 1
    )
    assert total(samples, prefix + "messages_deferred_total") == poison_count - 1
    assert total(samples, prefix + "messages_received_total") >= len(stream) + 1
    assert total(samples, prefix + "handler_duration_seconds_count") >= healthy
    assert total(samples, prefix + "sessions_accepted_total") >= 13
    assert total(samples, prefix + "sessions_parked") >= 1


async def test_metric_labels_never_carry_ids(
    broker: Any, json_logs: io.StringIO
) -> None:
    stream, _, samples = await run_with_one_poison_order(broker.connection_string)

    ids = {message.session_id for message in stream}
    label_values = {value for _, labels in samples for _, value in labels}
    assert label_values & ids == set()
    assert not any(value.startswith("ORD-") for value in label_values)
    assert {
        value for _, labels in samples for key, value in labels if key == "entity"
    } <= {ENTITY}


async def test_failing_order_found_in_json_logs(
    broker: Any, json_logs: io.StringIO
) -> None:
    stream, poison_order, _ = await run_with_one_poison_order(broker.connection_string)

    lines = [json.loads(line) for line in json_logs.getvalue().splitlines() if line]
    order_lines = [line for line in lines if line.get("order_id") == poison_order]
    mentioning = [line for line in lines if poison_order in json.dumps(line)]
    dead_lettered = [
        line for line in order_lines if line["event"] == "message_dead_lettered"
    ]
    deferred = [line for line in order_lines if line["event"] == "message_deferred"]
    poison_count = sum(1 for message in stream if message.session_id == poison_order)

    assert mentioning == order_lines
    assert len(dead_lettered) == 1
    assert dead_lettered[0]["level"] == "error"
    assert dead_lettered[0]["reason"] == "FraudSuspected"
    assert dead_lettered[0]["description"] == "customer is on the block list"
    assert len(deferred) == poison_count - 1
    for line in dead_lettered + deferred:
        for key in MESSAGE_IDS + MESSAGE_NUMBERS:
            assert line.get(key) is not None, (key, line["event"])
    levels = Counter(line["level"] for line in order_lines)
    assert levels["error"] == 1
