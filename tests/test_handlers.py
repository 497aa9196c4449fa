"""Bundled handlers: transitions, idempotency, thread safety and the reference."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from azure.servicebus import ServiceBusReceivedMessage, ServiceBusSubQueue
from azure.servicebus.aio import ServiceBusClient

import handlers
from consumer.app import ConsumerApp
from consumer.config import Settings, local_connection_string
from consumer.errors import PermanentError
from consumer.events import EVENT_TYPES, Event, validate_event
from consumer.generate import generate_stream
from consumer.publish import message_id_for, publish_events
from consumer.routing import EventContext, Router, bind_log
from handlers.projection import InvalidTransition, OrderStatus
from handlers.reference import project_stream
from handlers.store import ProjectionStore

ORDER = "ORD-1"
_message_numbers = itertools.count(1)


def make_event(event_type: str, **payload: Any) -> Event[Any]:
    return validate_event(
        {
            "eventType": event_type,
            "timestamp": "2026-11-27T08:00:00Z",
            "version": "1.0",
            "payload": {"orderId": ORDER, **payload},
            "metadata": {"source": "test", "correlationId": "corr-1"},
        }
    )


def created() -> Event[Any]:
    return make_event(
        "ORDER_CREATED",
        customerId="CUST-1",
        items=[{"productId": "P-1", "quantity": 2, "price": 50.05}],
        totalAmount=100.10,
        shippingAddress={"street": "1 Main St", "city": "Porto", "country": "PT"},
    )


def payment(event_type: str, amount: float, currency: str = "EUR") -> Event[Any]:
    return make_event(event_type, paymentId="PAY-1", amount=amount, currency=currency)


def authorized(amount: float = 100.10) -> Event[Any]:
    return payment("PAYMENT_AUTHORIZED", amount)


def captured(amount: float = 100.10) -> Event[Any]:
    return payment("PAYMENT_CAPTURED", amount)


def started() -> Event[Any]:
    return make_event("FULFILLMENT_STARTED", warehouseId="WH-1")


def shipped() -> Event[Any]:
    return make_event("ORDER_SHIPPED", carrier="DHL", trackingNumber="TRK1")


def delivered() -> Event[Any]:
    return make_event("ORDER_DELIVERED", deliveredAt="2026-11-27T10:00:00Z")


def notified() -> Event[Any]:
    return make_event(
        "CUSTOMER_NOTIFIED", customerId="CUST-1", channel="sms", template="x"
    )


def cancelled() -> Event[Any]:
    return make_event("ORDER_CANCELLED", reason="customer_request")


class Dispatcher:
    """Calls the bundled handlers the way the app does: by event type, with a ctx."""

    def __init__(self, store: ProjectionStore) -> None:
        self.store = store
        self.routers = handlers.build_routers(store)

    def context(self, event: Event[Any], message_id: str) -> EventContext:
        return EventContext(
            order_id=event.order_id,
            message_id=message_id,
            sequence_number=1,
            delivery_count=1,
            correlation_id=event.metadata.correlation_id,
            enqueued_at=None,
            event_type=event.event_type,
            entity="orders.test.events",
            attempt=1,
            log=bind_log(order_id=event.order_id, message_id=message_id),
        )

    def call(self, event: Event[Any], ctx: EventContext) -> None:
        specs = [
            spec
            for router in self.routers
            for spec in router.handlers_for(event.event_type)
        ]
        assert len(specs) == 1, event.event_type
        specs[0].func(event, ctx)

    def handle(self, event: Event[Any], message_id: str | None = None) -> None:
        message_id = message_id or f"msg-{next(_message_numbers)}"
        self.call(event, self.context(event, message_id))

    def handle_all(self, *events: Event[Any]) -> None:
        for event in events:
            self.handle(event)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with ProjectionStore(tmp_path / "nested" / "orders.sqlite3") as opened:
        yield opened


@pytest.fixture
def dispatcher(store: ProjectionStore) -> Dispatcher:
    return Dispatcher(store)


def test_every_event_type_has_one_handler(store: ProjectionStore) -> None:
    routers = handlers.build_routers(store)

    for event_type in EVENT_TYPES:
        owners = [r for r in routers if r.handlers_for(event_type)]
        assert len(owners) == 1, event_type


def test_happy_path_projection(dispatcher: Dispatcher) -> None:
    dispatcher.handle_all(
        created(), notified(), authorized(), captured(), started(), shipped()
    )
    dispatcher.handle_all(notified(), delivered())

    order = dispatcher.store.get(ORDER)
    assert order is not None
    assert order.status is OrderStatus.DELIVERED
    assert order.customer_id == "CUST-1"
    assert order.total_amount == Decimal("100.10")
    assert order.amount_authorized == Decimal("100.10")
    assert order.amount_captured == Decimal("100.10")
    assert order.amount_refunded == Decimal(0)
    assert order.currency == "EUR"
    assert order.warehouse_id == "WH-1"
    assert (order.carrier, order.tracking_number) == ("DHL", "TRK1")
    assert order.delivered_at == "2026-11-27T10:00:00+00:00"
    assert order.notifications_sent == 2
    assert order.events_applied == 8


def test_full_refund_after_delivery(dispatcher: Dispatcher) -> None:
    dispatcher.handle_all(created(), authorized(), captured(), started(), shipped())
    dispatcher.handle_all(delivered(), payment("PAYMENT_REFUNDED", 100.10))

    order = dispatcher.store.get(ORDER)
    assert order is not None
    assert order.status is OrderStatus.REFUNDED
    assert order.amount_refunded == Decimal("100.10")
    assert order.delivered_at is not None


def test_partial_captures_and_refunds_add_up(dispatcher: Dispatcher) -> None:
    dispatcher.handle_all(created(), authorized(), captured(60.05), captured(40.05))
    dispatcher.handle(payment("PAYMENT_REFUNDED", 0.1))
    dispatcher.handle(payment("PAYMENT_REFUNDED", 0.2))

    order = dispatcher.store.get(ORDER)
    assert order is not None
    assert order.amount_captured == Decimal("100.10")
    assert order.amount_refunded == Decimal("0.3")
    assert order.status is OrderStatus.PAID


def test_update_changes_total(dispatcher: Dispatcher) -> None:
    dispatcher.handle_all(created(), make_event("ORDER_UPDATED", totalAmount=120.0))

    order = dispatcher.store.get(ORDER)
    assert order is not None
    assert order.total_amount == Decimal("120.0")
    assert order.status is OrderStatus.CREATED


def test_payment_failure_then_cancel(dispatcher: Dispatcher) -> None:
    failure = make_event("PAYMENT_FAILED", paymentId="PAY-1", reason="card_declined")
    dispatcher.handle_all(created(), authorized(), failure, notified())
    dispatcher.handle_all(make_event("ORDER_CANCELLED", reason="payment_failed"))

    order = dispatcher.store.get(ORDER)
    assert order is not None
    assert order.status is OrderStatus.CANCELLED
    assert order.payment_failure_reason == "card_declined"
    assert order.cancel_reason == "payment_failed"


def test_notification_after_cancel_is_counted(dispatcher: Dispatcher) -> None:
    dispatcher.handle_all(created(), cancelled(), notified())

    order = dispatcher.store.get(ORDER)
    assert order is not None
    assert order.notifications_sent == 1


IMPOSSIBLE = [
    (
        "shipment before capture",
        [created(), authorized()],
        shipped(),
        "not been captured",
    ),
    ("fulfillment before capture", [created()], started(), "not been captured"),
    (
        "capture above authorized",
        [created(), authorized(50.0)],
        captured(50.01),
        "above the authorized 50.0",
    ),
    (
        "refund above captured",
        [created(), authorized(), captured(10.0)],
        payment("PAYMENT_REFUNDED", 10.5),
        "above the captured 10.0",
    ),
    (
        "refund without capture",
        [created(), authorized()],
        payment("PAYMENT_REFUNDED", 1.0),
        "above the captured 0",
    ),
    (
        "capture after cancel",
        [created(), authorized(), cancelled()],
        captured(),
        "cancelled",
    ),
    ("ship after cancel", [created(), cancelled()], shipped(), "was cancelled"),
    (
        "cancel after delivery",
        [created(), authorized(), captured(), started(), shipped(), delivered()],
        cancelled(),
        "already delivered",
    ),
    (
        "cancel after shipment",
        [created(), authorized(), captured(), started(), shipped()],
        cancelled(),
        "only possible in status",
    ),
    ("delivery before shipment", [created()], delivered(), "only possible in status"),
    ("second creation", [created()], created(), "already exists"),
    ("event before creation", [], authorized(), "does not exist"),
    (
        "capture in other currency",
        [created(), authorized()],
        payment("PAYMENT_CAPTURED", 1.0, currency="USD"),
        "differs from the order's currency EUR",
    ),
    (
        "update after capture",
        [created(), authorized(), captured()],
        make_event("ORDER_UPDATED", totalAmount=1.0),
        "only possible in status",
    ),
]


@pytest.mark.parametrize(
    ("history", "event", "message"),
    [case[1:] for case in IMPOSSIBLE],
    ids=[case[0] for case in IMPOSSIBLE],
)
def test_impossible_transition_rejected(
    dispatcher: Dispatcher, history: list[Event[Any]], event: Event[Any], message: str
) -> None:
    dispatcher.handle_all(*history)
    before = dispatcher.store.get(ORDER)
    applied_before = dispatcher.store.applied_count()

    with pytest.raises(InvalidTransition) as caught:
        dispatcher.handle(event)

    assert isinstance(caught.value, PermanentError)
    assert message in str(caught.value)
    assert ORDER in str(caught.value)
    assert dispatcher.store.get(ORDER) == before
    assert dispatcher.store.applied_count() == applied_before


def test_redelivery_changes_nothing(dispatcher: Dispatcher) -> None:
    dispatcher.handle(created(), message_id="m-1")
    dispatcher.handle(authorized(), message_id="m-2")
    dispatcher.handle(captured(50.0), message_id="m-3")
    first = dispatcher.store.get(ORDER)

    dispatcher.handle(captured(50.0), message_id="m-3")
    dispatcher.handle(authorized(), message_id="m-2")

    assert dispatcher.store.get(ORDER) == first
    assert dispatcher.store.applied_count() == 3


def test_store_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "orders.sqlite3"
    with ProjectionStore(path) as first:
        Dispatcher(first).handle_all(created(), authorized())
        expected = first.get(ORDER)

    with ProjectionStore(path) as second:
        assert second.get(ORDER) == expected
        assert second.all() == {ORDER: expected}
        assert second.get("ORD-unknown") is None


@pytest.fixture(scope="module")
def stream() -> list[dict[str, Any]]:
    return generate_stream(300, seed=5)


def ids_for(stream: list[dict[str, Any]]) -> list[tuple[Event[Any], str]]:
    return [(validate_event(item), message_id_for(item)) for item in stream]


def test_store_matches_reference(tmp_path: Path, stream: list[dict[str, Any]]) -> None:
    expected = project_stream(stream)

    with ProjectionStore(tmp_path / "orders.sqlite3") as store:
        dispatcher = Dispatcher(store)
        for event, message_id in ids_for(stream):
            dispatcher.handle(event, message_id)
        actual = store.all()

    assert len(expected) == 300
    assert actual == expected


def test_concurrent_sessions_match_reference(
    tmp_path: Path, stream: list[dict[str, Any]]
) -> None:
    sessions: dict[str, list[tuple[Event[Any], str]]] = defaultdict(list)
    for event, message_id in ids_for(stream):
        sessions[event.order_id].append((event, message_id))
    order_ids = sorted(sessions)
    errors: list[BaseException] = []

    def work(dispatcher: Dispatcher, share: list[str]) -> None:
        try:
            for order_id in share:
                for event, message_id in sessions[order_id]:
                    dispatcher.handle(event, message_id)
                    # A redelivery right after must change nothing.
                    dispatcher.handle(event, message_id)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    with ProjectionStore(tmp_path / "orders.sqlite3") as store:
        dispatcher = Dispatcher(store)
        threads = [
            threading.Thread(target=work, args=(dispatcher, order_ids[i::8]))
            for i in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        actual = store.all()
        applied = store.applied_count()

    assert errors == []
    assert actual == project_stream(stream)
    assert applied == len(stream)


def test_reference_skips_rejected_and_repeated() -> None:
    stream = generate_stream(2, seed=3)
    first_order = stream[0]["payload"]["orderId"]
    bogus = dict(stream[0], eventType="ORDER_SHIPPED")
    bogus["payload"] = {"orderId": first_order, "carrier": "DHL", "trackingNumber": "T"}

    with_noise = [stream[0], stream[0], bogus, *stream[1:]]

    assert project_stream(with_noise) == project_stream(stream)


def test_install_adds_routers_and_opens_store(tmp_path: Path) -> None:
    settings = Settings(
        connection_string=local_connection_string(),
        store_path=str(tmp_path / "var" / "orders-{env}.sqlite3"),
    )
    app = ConsumerApp(settings)

    store = handlers.install(app)
    try:
        assert (tmp_path / "var" / "orders-dev.sqlite3").is_file()
        assert app.router.event_types == frozenset(EVENT_TYPES)
        assert isinstance(store, ProjectionStore)
    finally:
        store.close()


def test_build_routers_returns_routers(store: ProjectionStore) -> None:
    routers = handlers.build_routers(store)

    assert len(routers) == 3
    assert all(isinstance(router, Router) for router in routers)


# Through the local broker and the real consumer ------------------------------------


QUEUE = "handlers.test.events"


@pytest.fixture
def broker() -> Iterator[Any]:
    """A local broker on a free 127.0.0.1 port with one session queue."""
    from localbus.testing import run_broker

    with run_broker(entities=[QUEUE], lock_duration_s=5.0) as running:
        yield running


def settings_for(broker: Any, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "connection_string": broker.connection_string,
        "entity": QUEUE,
        "max_concurrent_sessions": 32,
        "session_idle_timeout_s": 0.05,
        "accept_timeout_s": 0.5,
        "retry_attempts": 2,
        "retry_backoff_s": 0.01,
        "retry_max_backoff_s": 0.05,
        "handler_timeout_s": 10.0,
        "metrics_port": 0,
        "store_path": str(tmp_path / "orders.sqlite3"),
    }
    return Settings(**(values | overrides))


async def consume_with_handlers(
    broker: Any, tmp_path: Path, stream: list[dict[str, Any]], **overrides: Any
) -> dict[str, Any]:
    """Publish `stream`, consume it with the bundled handlers, return the store."""
    settings = settings_for(broker, tmp_path, **overrides)
    await publish_events(settings, stream)
    app = ConsumerApp(settings)
    store = handlers.install(app)
    try:
        await asyncio.wait_for(app.run(until_idle_s=1.0), timeout=90)
        return dict(store.all())
    finally:
        store.close()


async def dead_letters(connection_string: str) -> list[ServiceBusReceivedMessage]:
    """Receive and complete every message of the queue's dead-letter queue."""
    found: list[ServiceBusReceivedMessage] = []
    async with ServiceBusClient.from_connection_string(connection_string) as client:
        receiver = client.get_queue_receiver(
            QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=1.0
        )
        async with receiver:
            while batch := await receiver.receive_messages(20, max_wait_time=1.0):
                for message in batch:
                    await receiver.complete_message(message)
                found.extend(batch)
    return found


@pytest.mark.slow
async def test_consumed_stream_matches_reference(broker: Any, tmp_path: Path) -> None:
    stream = generate_stream(60, seed=21)

    actual = await consume_with_handlers(broker, tmp_path, stream)

    assert len(actual) == 60
    assert actual == project_stream(stream)
    assert await dead_letters(broker.connection_string) == []


@pytest.mark.slow
async def test_impossible_event_dead_lettered(broker: Any, tmp_path: Path) -> None:
    stream = generate_stream(20, seed=8)
    target = stream[0]["payload"]["orderId"]
    early_shipment = {
        **stream[0],
        "eventType": "ORDER_SHIPPED",
        "payload": {"orderId": target, "carrier": "DHL", "trackingNumber": "TRK0"},
    }
    stream.insert(1, early_shipment)

    actual = await consume_with_handlers(
        broker, tmp_path, stream, poison_policy="continue"
    )

    dead = await dead_letters(broker.connection_string)
    assert [message.session_id for message in dead] == [target]
    assert dead[0].dead_letter_reason == "InvalidTransition"
    assert "payment has not been captured" in str(dead[0].dead_letter_error_description)
    assert dead[0].message_id == message_id_for(early_shipment)
    assert actual == project_stream(stream)


def test_missing_message_id_uses_sequence_number(dispatcher: Dispatcher) -> None:
    dispatcher.handle(created(), message_id="m-1")
    context = dispatcher.context(notified(), message_id="")

    for _ in range(2):
        dispatcher.call(notified(), context)
    dispatcher.call(notified(), replace(context, sequence_number=99))

    order = dispatcher.store.get(ORDER)
    assert order is not None
    assert order.notifications_sent == 2
    assert order.last_message_id == "sequence-number:99"
