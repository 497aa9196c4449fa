"""The handler test harness runs the production pipeline on in-memory sessions."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import structlog

from consumer import DeadLetter, EventContext, PermanentError, RetryLater
from consumer.app import ConsumerApp
from consumer.config import Settings, local_connection_string
from consumer.testing import ConsumerTestHarness, make_event


class StockMissing(PermanentError):
    """A permanent failure used to check the class-name reason."""


def new_app(**overrides: Any) -> ConsumerApp:
    values: dict[str, Any] = {
        "env": "dev",
        "connection_string": local_connection_string(),
        "metrics_port": 0,
        "retry_attempts": 3,
        "max_delivery_count": 3,
    }
    values.update(overrides)
    return ConsumerApp(Settings(**values))


def recording_app(calls: list[str], **overrides: Any) -> ConsumerApp:
    """An app whose ORDER_CREATED and PAYMENT_CAPTURED handlers record message ids."""
    app = new_app(**overrides)

    async def record(event: Any, ctx: EventContext) -> None:
        ctx.log.info("event_recorded", note="from the handler")
        calls.append(ctx.message_id)

    app.router.add_handler("ORDER_CREATED", record)
    app.router.add_handler("PAYMENT_CAPTURED", record)
    return app


async def test_handled_event_completes() -> None:
    calls: list[str] = []
    harness = ConsumerTestHarness(recording_app(calls))

    result = await harness.deliver(make_event("ORDER_CREATED", "o-1"), message_id="m1")

    assert result.completed
    assert result.outcome == "completed"
    assert result.order_id == "o-1"
    assert result.deliveries == 1
    assert calls == ["m1"]
    completed = harness.metric("messages_completed_total", event_type="ORDER_CREATED")
    assert completed == 1.0
    assert harness.metric("messages_dead_lettered") == 0.0


async def test_handler_log_lines_are_captured_with_ids() -> None:
    harness = ConsumerTestHarness(recording_app([]))

    result = await harness.deliver(make_event("ORDER_CREATED", "o-7"), message_id="m7")

    [line] = [entry for entry in result.logs if entry["event"] == "event_recorded"]
    assert line["order_id"] == "o-7"
    assert line["message_id"] == "m7"
    assert line["log_level"] == "info"
    assert any(entry["event"] == "event_recorded" for entry in harness.logs)


def bind_tenant(event: Any, ctx: EventContext) -> None:
    structlog.contextvars.bind_contextvars(tenant="t-1")
    ctx.log.info("tenant_bound")


async def bind_tenant_async(event: Any, ctx: EventContext) -> None:
    bind_tenant(event, ctx)


@pytest.mark.parametrize("handler", [bind_tenant, bind_tenant_async])
async def test_handler_context_stays_in_handler(handler: Any) -> None:
    app = new_app()
    app.router.add_handler("ORDER_CREATED", handler)
    harness = ConsumerTestHarness(app)

    await harness.deliver(make_event("ORDER_CREATED", "o-1"), message_id="m1")
    await harness.deliver(make_event("ORDER_CREATED", "o-1"), message_id="m2")

    bound = [entry for entry in harness.logs if entry["event"] == "tenant_bound"]
    completed = [e for e in harness.logs if e["event"] == "message_completed"]
    assert len(bound) == 2
    assert all(entry["tenant"] == "t-1" for entry in bound)
    assert len(completed) == 2
    assert all("tenant" not in entry for entry in completed)


async def test_duplicate_message_id_runs_handlers_once() -> None:
    calls: list[str] = []
    harness = ConsumerTestHarness(recording_app(calls))
    event = make_event("ORDER_CREATED", "o-1")

    first = await harness.deliver(event, message_id="same")
    second = await harness.deliver(event, message_id="same")

    assert first.completed
    assert second.outcome == "duplicate"
    assert calls == ["same"]
    assert harness.metric("messages_duplicate") == 1.0


async def test_run_keeps_each_order_in_sequence() -> None:
    calls: list[str] = []
    harness = ConsumerTestHarness(recording_app(calls))
    events = [
        make_event("ORDER_CREATED", "o-1"),
        make_event("ORDER_CREATED", "o-2"),
        make_event("PAYMENT_CAPTURED", "o-1"),
    ]

    results = await harness.run(events)

    assert [result.outcome for result in results] == ["completed"] * 3
    ids = {result.sequence_number: result.message_id for result in results}
    order_one = [ids[results[0].sequence_number], ids[results[2].sequence_number]]
    assert [call for call in calls if call in order_one] == order_one


def raising_app(error: BaseException, **overrides: Any) -> ConsumerApp:
    app = new_app(**overrides)

    async def fail(event: Any, ctx: EventContext) -> None:
        raise error

    app.router.add_handler("ORDER_CREATED", fail)
    return app


@pytest.mark.parametrize(
    ("body", "session_id", "reason"),
    [
        (b"not json at all", "o-1", "MalformedBody"),
        (b'{"eventType": "ORDER_CREATED"}', "o-1", "SchemaValidationFailed"),
    ],
)
async def test_rejected_body_is_dead_lettered(
    body: bytes, session_id: str, reason: str
) -> None:
    harness = ConsumerTestHarness(recording_app([]))

    result = await harness.deliver(body, session_id=session_id)

    assert result.dead_lettered_with(reason), result


async def test_event_without_handler_is_dead_lettered() -> None:
    harness = ConsumerTestHarness(recording_app([]))

    result = await harness.deliver(make_event("ORDER_SHIPPED", "o-1"))

    assert result.dead_lettered_with("UnknownEventType", "ORDER_SHIPPED"), result
    assert harness.metric("messages_dead_lettered", reason="UnknownEventType") == 1.0


async def test_order_id_differing_from_session_is_dead_lettered() -> None:
    harness = ConsumerTestHarness(recording_app([]))

    result = await harness.deliver(make_event("ORDER_CREATED", "o-1"), "o-2")

    assert result.dead_lettered_with("SessionMismatch"), result
    assert result.order_id == "o-2"


async def test_dead_letter_signal_sets_reason_and_description() -> None:
    error = DeadLetter("EmptyOrder", "no items to reserve")
    harness = ConsumerTestHarness(raising_app(error))

    result = await harness.deliver(make_event("ORDER_CREATED", "o-1"))

    assert result.dead_lettered_with("EmptyOrder", "no items to reserve"), result
    dead_letter_lines = [
        entry for entry in result.logs if entry["event"] == "message_dead_lettered"
    ]
    assert dead_letter_lines[0]["log_level"] == "error"


async def test_permanent_error_uses_class_name_as_reason() -> None:
    harness = ConsumerTestHarness(raising_app(StockMissing("sku-1 is gone")))

    result = await harness.deliver(make_event("ORDER_CREATED", "o-1"))

    assert result.dead_lettered_with("StockMissing", "sku-1 is gone"), result
    assert result.deliveries == 1


async def test_failing_handler_ends_in_max_retries_exceeded() -> None:
    harness = ConsumerTestHarness(
        raising_app(RuntimeError("database down")), poison_policy="continue"
    )

    result = await harness.deliver(make_event("ORDER_CREATED", "o-1"))

    assert result.dead_lettered_with("MaxRetriesExceeded", "database down"), result
    # max_delivery_count=3: two abandons, then the framework dead-letters the third.
    assert result.deliveries == 3
    assert harness.parked_orders() == {}


@pytest.mark.parametrize("asynchronous", [True, False])
async def test_handler_timeout_dead_letters(asynchronous: bool) -> None:
    app = new_app(handler_timeout_s=0.05, retry_attempts=1, max_delivery_count=1)
    release = threading.Event()

    def block(event: Any, ctx: EventContext) -> None:
        release.wait(timeout=30)

    async def block_async(event: Any, ctx: EventContext) -> None:
        await asyncio.sleep(30)

    app.router.add_handler("ORDER_CREATED", block_async if asynchronous else block)
    harness = ConsumerTestHarness(app)
    try:
        result = await harness.deliver(make_event("ORDER_CREATED", "o-1"))
    finally:
        release.set()

    timed_out = "ran longer than handler_timeout_s=0.05"
    assert result.dead_lettered_with("MaxRetriesExceeded", timed_out), result
    assert harness.metric("handlers_in_flight") == 0.0


async def test_retry_then_success_completes_in_one_delivery() -> None:
    attempts: list[int] = []
    app = new_app()

    async def flaky(event: Any, ctx: EventContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise RetryLater(0.5, "inventory service busy")

    app.router.add_handler("ORDER_CREATED", flaky)
    harness = ConsumerTestHarness(app)

    result = await harness.deliver(make_event("ORDER_CREATED", "o-1"))

    assert result.completed
    assert attempts == [1, 2, 3]
    assert result.deliveries == 1
    retried = [entry for entry in result.logs if entry["event"] == "handler_retried"]
    assert len(retried) == 2
    assert harness.metric("handler_attempts", outcome="retry") == 2.0


async def test_retry_across_deliveries_after_abandon() -> None:
    deliveries: list[int] = []
    app = new_app(retry_attempts=1)

    async def fails_first_delivery(event: Any, ctx: EventContext) -> None:
        deliveries.append(ctx.delivery_count)
        if ctx.delivery_count == 0:
            raise ConnectionError("downstream reset the connection")

    app.router.add_handler("ORDER_CREATED", fails_first_delivery)
    harness = ConsumerTestHarness(app)

    result = await harness.deliver(make_event("ORDER_CREATED", "o-1"))

    assert result.completed
    assert result.deliveries == 2
    assert deliveries == [0, 1]
    assert harness.metric("messages_abandoned") == 1.0


async def test_dead_letter_parks_order_and_defers_later_events() -> None:
    calls: list[str] = []
    app = new_app()

    async def reserve(event: Any, ctx: EventContext) -> None:
        raise DeadLetter("EmptyOrder", "nothing to reserve")

    async def capture(event: Any, ctx: EventContext) -> None:
        calls.append(ctx.message_id)

    app.router.add_handler("ORDER_CREATED", reserve)
    app.router.add_handler("PAYMENT_CAPTURED", capture)
    harness = ConsumerTestHarness(app)

    created, captured = await harness.run(
        [make_event("ORDER_CREATED", "o-1"), make_event("PAYMENT_CAPTURED", "o-1")]
    )
    later = await harness.deliver(make_event("PAYMENT_CAPTURED", "o-1"))

    assert created.dead_lettered_with("EmptyOrder")
    assert captured.deferred
    assert later.deferred
    assert calls == []
    parked = harness.parked_orders()
    assert list(parked) == ["o-1"]
    assert parked["o-1"].reason == "EmptyOrder"
    assert parked["o-1"].message_id == created.message_id


async def test_unknown_metric_name_is_rejected() -> None:
    harness = ConsumerTestHarness(recording_app([]))
    await harness.deliver(make_event("ORDER_CREATED", "o-1"))

    with pytest.raises(ValueError, match="unknown metric"):
        harness.metric("messages_teleported_total")


def test_make_event_rejects_unknown_type() -> None:
    with pytest.raises(ValueError, match="unknown event type"):
        make_event("ORDER_TELEPORTED")


def test_make_event_recomputes_total_for_new_items() -> None:
    items = [{"productId": "sku-9", "quantity": 3, "price": 2.5}]

    event = make_event("ORDER_CREATED", "o-1", items=items)

    assert event["payload"]["totalAmount"] == 7.5
    assert event["payload"]["orderId"] == "o-1"
