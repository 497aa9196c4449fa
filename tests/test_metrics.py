"""Names, labels and buckets of the consumer's Prometheus metrics."""

from __future__ import annotations

from pathlib import Path

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.samples import Sample

from consumer.events import EVENT_TYPES
from consumer.metrics import (
    KNOWN_REASONS,
    MAX_EXTRA_REASONS,
    PREFIX,
    ConsumerMetrics,
    event_type_label,
)

BY_EVENT = ("entity", "event_type")
LABELS = ("orders", "ORDER_CREATED")

# attribute -> (collector type, exposed family name, label names)
EXPECTED = {
    "messages_received": (Counter, "messages_received", BY_EVENT),
    "messages_completed": (Counter, "messages_completed", BY_EVENT),
    "messages_abandoned": (Counter, "messages_abandoned", BY_EVENT),
    "messages_deferred": (Counter, "messages_deferred", BY_EVENT),
    "messages_duplicate": (Counter, "messages_duplicate", BY_EVENT),
    "messages_ignored": (Counter, "messages_ignored", BY_EVENT),
    "messages_dead_lettered": (
        Counter,
        "messages_dead_lettered",
        ("entity", "event_type", "reason"),
    ),
    "handler_duration": (Histogram, "handler_duration_seconds", BY_EVENT),
    "end_to_end_lag": (Histogram, "end_to_end_lag_seconds", BY_EVENT),
    "handler_attempts": (
        Counter,
        "handler_attempts",
        ("entity", "event_type", "outcome"),
    ),
    "sessions_held": (Gauge, "sessions_held", ("entity",)),
    "sessions_parked": (Gauge, "sessions_parked", ("entity",)),
    "handlers_in_flight": (Gauge, "handlers_in_flight", ("entity",)),
    "connection_up": (Gauge, "connection_up", ("entity",)),
    "sessions_accepted": (Counter, "sessions_accepted", ("entity",)),
    "sessions_released": (Counter, "sessions_released", ("entity",)),
    "sessions_lost": (Counter, "sessions_lost", ("entity",)),
    "reconnects": (Counter, "reconnects", ("entity",)),
    "lock_renewals": (Counter, "lock_renewals", ("entity", "kind")),
    "lock_renewal_failures": (Counter, "lock_renewal_failures", ("entity", "kind")),
}

REPO_ROOT = Path(__file__).resolve().parent.parent


def _touch(collector: Counter | Gauge | Histogram, labels: tuple[str, ...]) -> None:
    child = collector.labels(**{name: f"v-{name}" for name in labels})
    if isinstance(child, Histogram):
        child.observe(0.5)
    elif isinstance(child, Gauge):
        child.set(2)
    else:
        child.inc()


def _samples(registry: CollectorRegistry, family: str) -> list[Sample]:
    for metric in registry.collect():
        if metric.name == family:
            return list(metric.samples)
    raise AssertionError(f"family {family} not in registry")


@pytest.mark.parametrize("attribute", sorted(EXPECTED))
def test_metric_type_name_and_labels(attribute: str) -> None:
    metrics = ConsumerMetrics()
    kind, family, labels = EXPECTED[attribute]
    collector = getattr(metrics, attribute)
    assert isinstance(collector, kind)

    _touch(collector, labels)

    samples = _samples(metrics.registry, PREFIX + family)
    assert samples, f"no samples for {family}"
    for sample in samples:
        assert set(sample.labels) - {"le"} == set(labels)


def test_counter_exposed_with_total_suffix() -> None:
    metrics = ConsumerMetrics()
    metrics.messages_completed.labels("orders", "ORDER_CREATED").inc(3)

    sample = metrics.registry.get_sample_value(
        "orders_consumer_messages_completed_total",
        {"entity": "orders", "event_type": "ORDER_CREATED"},
    )

    assert sample == 3.0


@pytest.mark.parametrize("attribute", ["handler_duration", "end_to_end_lag"])
def test_histogram_buckets_span_ms_to_minutes(attribute: str) -> None:
    metrics = ConsumerMetrics()
    getattr(metrics, attribute).labels("orders", "ORDER_CREATED").observe(0.0005)

    bounds = [
        float(sample.labels["le"])
        for sample in _samples(metrics.registry, PREFIX + EXPECTED[attribute][1])
        if sample.name.endswith("_bucket") and sample.labels["le"] != "+Inf"
    ]

    assert bounds == sorted(bounds)
    assert bounds[0] == 0.001
    assert bounds[-1] >= 120.0
    assert bounds[-1] <= 900.0


def test_fresh_registry_per_instance() -> None:
    first = ConsumerMetrics()
    second = ConsumerMetrics()
    first.messages_received.labels("orders", "ORDER_CREATED").inc()

    assert first.registry is not second.registry
    assert (
        second.value("messages_received", entity="orders", event_type="ORDER_CREATED")
        == 0.0
    )
    assert (
        prometheus_client.REGISTRY.get_sample_value(
            "orders_consumer_messages_received_total",
            {"entity": "orders", "event_type": "ORDER_CREATED"},
        )
        is None
    )


def test_given_registry_is_used() -> None:
    registry = CollectorRegistry()

    metrics = ConsumerMetrics(registry)

    assert metrics.registry is registry
    assert (
        registry.get_sample_value("orders_consumer_sessions_held", {"entity": "x"})
        is None
    )


def test_value_reads_each_collector_type() -> None:
    metrics = ConsumerMetrics()
    metrics.messages_deferred.labels("orders", "ORDER_SHIPPED").inc(2)
    metrics.sessions_held.labels("orders").set(5)
    metrics.handler_duration.labels("orders", "ORDER_SHIPPED").observe(0.1)
    metrics.handler_duration.labels("orders", "ORDER_SHIPPED").observe(0.3)
    by_event = {"entity": "orders", "event_type": "ORDER_SHIPPED"}

    assert metrics.value("messages_deferred", **by_event) == 2.0
    assert metrics.value("sessions_held", entity="orders") == 5.0
    assert metrics.value("handler_duration", **by_event) == 2.0
    assert metrics.value(
        "orders_consumer_handler_duration_seconds_sum", **by_event
    ) == pytest.approx(0.4)
    assert metrics.value("messages_abandoned", **by_event) == 0.0


def test_value_rejects_unknown_name() -> None:
    metrics = ConsumerMetrics()

    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        metrics.value("nope")


def test_child_returns_cached_labels_child() -> None:
    metrics = ConsumerMetrics()

    first = metrics.child(metrics.messages_completed, *LABELS)
    again = metrics.child(metrics.messages_completed, *LABELS)
    first.inc()
    again.inc()

    assert again is first
    assert first is metrics.messages_completed.labels(*LABELS)
    count = metrics.value(
        "messages_completed", entity="orders", event_type="ORDER_CREATED"
    )
    assert count == 2.0


def test_child_keys_by_collector_and_values() -> None:
    metrics = ConsumerMetrics()

    completed = metrics.child(metrics.messages_completed, *LABELS)
    received = metrics.child(metrics.messages_received, *LABELS)
    other_type = metrics.child(metrics.messages_completed, "orders", "ORDER_UPDATED")

    assert completed is not received
    assert completed is not other_type


def test_event_type_label_bounds_values() -> None:
    assert len(EVENT_TYPES) == 11
    for event_type in EVENT_TYPES:
        assert event_type_label(event_type) == event_type
    assert event_type_label(None) == "unknown"
    assert event_type_label("") == "unknown"
    assert event_type_label("order-8c1f2a") == "unknown"
    assert event_type_label("order_created") == "unknown"


def test_reason_label_passes_known_reasons() -> None:
    metrics = ConsumerMetrics()

    for reason in KNOWN_REASONS:
        assert metrics.reason_label(reason) == reason


def test_reason_label_maps_free_text_to_other() -> None:
    metrics = ConsumerMetrics()

    assert metrics.reason_label(None) == "other"
    assert metrics.reason_label("") == "other"
    assert metrics.reason_label("order 42 failed: stock missing") == "other"
    assert metrics.reason_label("x" * 65) == "other"


def test_reason_label_caps_distinct_extra_reasons() -> None:
    metrics = ConsumerMetrics()
    extra = [f"InvalidTransition{i}" for i in range(MAX_EXTRA_REASONS)]

    for reason in extra:
        assert metrics.reason_label(reason) == reason

    assert metrics.reason_label("OneTooMany") == "other"
    assert metrics.reason_label(extra[0]) == extra[0]
    assert metrics.reason_label("MalformedBody") == "MalformedBody"


def test_operations_doc_lists_every_metric() -> None:
    doc = REPO_ROOT / "docs" / "operations.md"
    text = doc.read_text(encoding="utf-8")
    metrics = ConsumerMetrics()

    for metric in metrics.registry.collect():
        assert metric.name in text, f"{metric.name} missing from {doc}"
