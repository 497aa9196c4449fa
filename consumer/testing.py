"""Test harness for handler authors: run an app's handlers without a broker.

`ConsumerTestHarness` delivers events to in-memory sessions
(`consumer.transport.memory`) and runs them through a real `ConsumerApp` and
`SessionProcessor`, so parsing, validation, dispatch, retries, the checkpoint, parking
and the settlement table are the production code paths. Only the broker is replaced::

    async def test_payment_capture_completes() -> None:
        harness = ConsumerTestHarness(app)
        result = await harness.deliver(make_event("PAYMENT_CAPTURED", "order-1"))
        assert result.completed

Each `deliver` or `run` call starts a fresh `ConsumerApp` with the handlers of the app
under test, waits until every message it sent is settled, and stops it. Sessions, their
state and the dead-letter list live on in `harness.broker` between calls, so a second
call continues the same orders.

By default the harness removes retry backoff and shortens the idle and accept timeouts,
so a test takes milliseconds. Pass settings as keyword arguments to change that.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry
from structlog.testing import LogCapture

from consumer.checkpoint import CheckpointError, ParkRecord, SessionCheckpoint
from consumer.metrics import PREFIX
from consumer.transport import InboundMessage
from consumer.transport.memory import (
    MemoryBroker,
    MemorySessionReceiver,
    MemoryTransport,
)

if TYPE_CHECKING:
    from consumer.app import ConsumerApp

# Settings that make a harness run fast. Retries still happen, without waiting.
FAST_SETTINGS: dict[str, Any] = {
    "retry_backoff_s": 0.0,
    "retry_max_backoff_s": 0.0,
    "session_idle_timeout_s": 0.05,
    "accept_timeout_s": 0.05,
}
DEFAULT_TIMEOUT_S = 10.0
# Bound when a message is settled, so `DeliveryResult.logs` also finds the settlement
# line, which the processor logs after it cleared the message's own ids. The key stays
# bound in that worker task until its next settlement.
DELIVERY_KEY = "harness_sequence_number"

# A valid payload per event type, without `orderId`. `make_event` fills in the rest.
_ADDRESS = {"street": "1 Main Street", "city": "Berlin", "country": "DE"}
_ITEMS = [{"productId": "sku-1", "quantity": 2, "price": 5.0}]
_SAMPLE_PAYLOADS: dict[str, dict[str, Any]] = {
    "ORDER_CREATED": {
        "customerId": "customer-1",
        "items": _ITEMS,
        "totalAmount": 10.0,
        "shippingAddress": _ADDRESS,
    },
    "ORDER_UPDATED": {"shippingAddress": _ADDRESS},
    "ORDER_CANCELLED": {"reason": "customer_request"},
    "PAYMENT_AUTHORIZED": {"paymentId": "payment-1", "amount": 10.0, "currency": "EUR"},
    "PAYMENT_CAPTURED": {"paymentId": "payment-1", "amount": 10.0, "currency": "EUR"},
    "PAYMENT_FAILED": {"paymentId": "payment-1", "reason": "card_declined"},
    "PAYMENT_REFUNDED": {"paymentId": "payment-1", "amount": 10.0, "currency": "EUR"},
    "FULFILLMENT_STARTED": {"warehouseId": "warehouse-1"},
    "ORDER_SHIPPED": {"carrier": "DHL", "trackingNumber": "track-1"},
    "ORDER_DELIVERED": {"deliveredAt": "2026-01-02T10:00:00+00:00"},
    "CUSTOMER_NOTIFIED": {
        "customerId": "customer-1",
        "channel": "email",
        "template": "order_shipped",
    },
}


def make_event(
    event_type: str,
    order_id: str = "order-1",
    *,
    correlation_id: str | None = None,
    **payload: Any,
) -> dict[str, Any]:
    """Build a valid event of `event_type` for `order_id` as a JSON-ready dict.

    Keyword arguments replace payload fields and use the JSON (camelCase) names, for
    example `make_event("ORDER_CREATED", items=[...])`. When `items` is given without
    `totalAmount`, the total is computed from the items so the event stays valid.
    Raises `ValueError` for an unknown event type.
    """
    sample = _SAMPLE_PAYLOADS.get(event_type)
    if sample is None:
        raise ValueError(
            f"unknown event type {event_type!r}; known types: "
            f"{', '.join(sorted(_SAMPLE_PAYLOADS))}"
        )
    body = {"orderId": order_id, **copy.deepcopy(sample), **payload}
    if "items" in payload and "totalAmount" not in payload and "totalAmount" in body:
        body["totalAmount"] = sum(
            item.get("quantity", 0) * item.get("price", 0) for item in payload["items"]
        )
    return {
        "eventType": event_type,
        "timestamp": datetime.now(UTC).isoformat(),
        "version": "1.0",
        "payload": body,
        "metadata": {
            "source": "consumer.testing",
            "correlationId": correlation_id or f"correlation-{order_id}",
        },
    }


@dataclass(frozen=True)
class DeliveryResult:
    """The outcome of one delivered message.

    `outcome` is one of completed, duplicate (skipped by the checkpoint), ignored
    (unknown event type under `unknown_event_policy=ignore`), dead_lettered and
    deferred (its order is parked). `deliveries` counts broker deliveries: 1, plus
    one per abandon. `logs` are the captured log events of this message.
    """

    message_id: str
    order_id: str
    sequence_number: int
    outcome: str
    reason: str = ""
    description: str = ""
    deliveries: int = 1
    logs: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    @property
    def completed(self) -> bool:
        """Whether the handlers ran to the end and the message was completed."""
        return self.outcome == "completed"

    @property
    def dead_lettered(self) -> bool:
        """Whether the message went to the dead-letter queue, for any reason."""
        return self.outcome == "dead_lettered"

    @property
    def deferred(self) -> bool:
        """Whether the message was deferred because its order is parked."""
        return self.outcome == "deferred"

    def dead_lettered_with(self, reason: str, description: str | None = None) -> bool:
        """Return whether the message was dead-lettered with `reason`.

        With `description`, the dead-letter description must also contain that text.
        """
        if not self.dead_lettered or self.reason != reason:
            return False
        return description is None or description in self.description


@dataclass(frozen=True)
class _Settled:
    action: str
    reason: str = ""
    description: str = ""


class _SettlementRecord:
    """Settlements seen by the harness receivers, by sequence number."""

    def __init__(self) -> None:
        self.actions: dict[int, list[_Settled]] = {}
        self.changed = asyncio.Event()

    def add(self, message: InboundMessage, settled: _Settled) -> None:
        self.actions.setdefault(message.sequence_number, []).append(settled)
        self.changed.set()

    def final(self, sequence_number: int) -> _Settled | None:
        """Return the settlement that ends this message's delivery, if there is one."""
        for settled in self.actions.get(sequence_number, []):
            if settled.action != "abandon":
                return settled
        return None


class _RecordingReceiver:
    """A memory session receiver that reports every settlement to the harness."""

    def __init__(self, inner: MemorySessionReceiver, record: _SettlementRecord) -> None:
        self._inner = inner
        self._record = record

    def __getattr__(self, name: str) -> Any:
        # Everything but settlement (receive, session state, lock renewal, close)
        # passes straight through to the memory receiver.
        return getattr(self._inner, name)

    def _mark(self, message: InboundMessage) -> None:
        # The processor logs the settlement after clearing the message's ids, in the
        # same task, so a key bound here is still on that line.
        structlog.contextvars.bind_contextvars(
            **{DELIVERY_KEY: message.sequence_number}
        )

    async def complete(self, message: InboundMessage) -> None:
        """Complete the message and record it."""
        self._mark(message)
        await self._inner.complete(message)
        self._record.add(message, _Settled("complete"))

    async def abandon(self, message: InboundMessage) -> None:
        """Abandon the message and record it."""
        await self._inner.abandon(message)
        self._record.add(message, _Settled("abandon"))

    async def defer(self, message: InboundMessage) -> None:
        """Defer the message and record it."""
        self._mark(message)
        await self._inner.defer(message)
        self._record.add(message, _Settled("defer"))

    async def dead_letter(
        self, message: InboundMessage, reason: str, description: str
    ) -> None:
        """Dead-letter the message and record the reason and description."""
        self._mark(message)
        await self._inner.dead_letter(message, reason, description)
        self._record.add(message, _Settled("dead_letter", reason, description))


class _RecordingTransport(MemoryTransport):
    """A memory transport whose session receivers report settlements."""

    def __init__(self, broker: MemoryBroker, record: _SettlementRecord) -> None:
        super().__init__(broker)
        self._record = record

    async def accept_session(self, max_wait_s: float) -> Any:
        """Lock the next session with pending messages, or None after `max_wait_s`."""
        receiver = await super().accept_session(max_wait_s)
        if receiver is None:
            return None
        return _RecordingReceiver(receiver, self._record)


class ConsumerTestHarness:
    """Run the handlers of `app` against in-memory sessions and report outcomes.

    `settings` overrides fields of `app.settings` on top of `FAST_SETTINGS`, for
    example `ConsumerTestHarness(app, poison_policy="continue")`. `timeout_s` bounds
    each `deliver` or `run` call.
    """

    def __init__(
        self,
        app: ConsumerApp,
        *,
        entity: str = "orders.test.events",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        **settings: Any,
    ) -> None:
        self.app = app
        self.settings = app.settings.model_copy(update={**FAST_SETTINGS, **settings})
        self.broker = MemoryBroker(entity)
        self.timeout_s = timeout_s
        self._record = _SettlementRecord()
        self._logs: list[dict[str, Any]] = []
        self._registries: list[CollectorRegistry] = []

    @property
    def logs(self) -> list[dict[str, Any]]:
        """Every structlog event captured so far, each a dict with `event`.

        Each dict also has `log_level` and the ids bound while it was logged
        (`order_id`, `message_id`, `reason`, ...).
        """
        return list(self._logs)

    async def deliver(
        self,
        event: dict[str, Any] | bytes | str,
        session_id: str | None = None,
        *,
        message_id: str | None = None,
    ) -> DeliveryResult:
        """Send one event (a dict, or a raw body) and return its outcome.

        The session id defaults to `payload.orderId`. A raw body needs `session_id`.
        Raises `TimeoutError` when the message is not settled within `timeout_s`.
        """
        [result] = await self.run([event], session_id=session_id, message_id=message_id)
        return result

    async def run(
        self,
        events: Sequence[dict[str, Any] | bytes | str],
        *,
        session_id: str | None = None,
        message_id: str | None = None,
    ) -> list[DeliveryResult]:
        """Send `events` in order, run the consumer until all are settled, and
        return one result per event, in the same order.
        """
        numbers = [await self._send(event, session_id, message_id) for event in events]
        transport = _RecordingTransport(self.broker, self._record)
        app = self._new_app(transport)
        with self._captured_logs():
            task = asyncio.create_task(app.run())
            try:
                await self._wait_until_settled(numbers, task)
            finally:
                app.stop()
                await asyncio.wait_for(task, timeout=self.timeout_s)
        return [self._result(number) for number in numbers]

    def parked_orders(self) -> dict[str, ParkRecord]:
        """Return the parked orders by order id, with why and where each stopped."""
        parked: dict[str, ParkRecord] = {}
        for order_id, session in self.broker.sessions.items():
            try:
                checkpoint = SessionCheckpoint.decode(session.state)
            except CheckpointError:
                continue
            if checkpoint.parked is not None:
                parked[order_id] = checkpoint.parked
        return parked

    def metric(self, name: str, **labels: str) -> float:
        """Return a metric value summed over every run of this harness.

        `name` may omit the `orders_consumer_` prefix, and for a counter the `_total`
        suffix: "messages_completed_total" and "messages_completed" are the same.
        `labels` select series by a subset of their labels, so
        `metric("messages_dead_lettered", reason="EmptyOrder")` adds up all event
        types. A histogram name returns its observation count. A gauge returns its
        value at the end of the last run. Raises `ValueError` for an unknown name.
        """
        full = name if name.startswith(PREFIX) else PREFIX + name
        found = False
        total = 0.0
        for index, registry in enumerate(self._registries):
            last_run = index == len(self._registries) - 1
            for family in registry.collect():
                sample_name = _sample_name(family.name, family.type, full)
                if sample_name is None:
                    continue
                found = True
                if family.type == "gauge" and not last_run:
                    continue
                total += _sum_samples(family.samples, sample_name, labels)
        if not found and self._registries:
            raise ValueError(
                f"unknown metric {name!r}: expected a name such as "
                "'messages_completed_total' or 'handler_duration_seconds'"
            )
        return total

    async def _send(
        self,
        event: dict[str, Any] | bytes | str,
        session_id: str | None,
        message_id: str | None,
    ) -> int:
        subject: str | None = None
        correlation_id: str | None = None
        if isinstance(event, dict):
            body = json.dumps(event, separators=(",", ":")).encode("utf-8")
            subject = event.get("eventType")
            payload = event.get("payload")
            if session_id is None and isinstance(payload, dict):
                session_id = payload.get("orderId")
            metadata = event.get("metadata")
            if isinstance(metadata, dict):
                correlation_id = metadata.get("correlationId")
        else:
            body = event.encode("utf-8") if isinstance(event, str) else event
        if not isinstance(session_id, str) or not session_id:
            raise ValueError(
                "no session id: pass session_id=, or an event with payload.orderId"
            )
        return await self.broker.send(
            body,
            session_id=session_id,
            message_id=message_id or uuid.uuid4().hex,
            subject=subject if isinstance(subject, str) else None,
            correlation_id=correlation_id if isinstance(correlation_id, str) else None,
        )

    def _new_app(self, transport: _RecordingTransport) -> ConsumerApp:
        from consumer.app import ConsumerApp

        registry = CollectorRegistry()
        self._registries.append(registry)
        app = ConsumerApp(self.settings, registry=registry, transport=transport)
        app.include_router(self.app.router)
        return app

    async def _wait_until_settled(
        self, numbers: list[int], task: asyncio.Task[None]
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            waiting = [n for n in numbers if self._record.final(n) is None]
            if not waiting:
                return
            if task.done():
                task.result()
                raise RuntimeError(
                    f"the consumer stopped before settling messages {waiting}; "
                    "see harness.logs"
                )
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                raise TimeoutError(
                    f"messages with sequence numbers {waiting} were not settled "
                    f"within {self.timeout_s}s; see harness.logs"
                )
            self._record.changed.clear()
            changed = asyncio.ensure_future(self._record.changed.wait())
            try:
                await asyncio.wait(
                    {task, changed},
                    timeout=remaining_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                changed.cancel()

    @contextmanager
    def _captured_logs(self) -> Iterator[None]:
        previous = structlog.get_config()
        capture = LogCapture()
        structlog.configure(
            processors=[structlog.contextvars.merge_contextvars, capture],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            cache_logger_on_first_use=False,
        )
        try:
            yield
        finally:
            structlog.configure(**previous)
            self._logs.extend(capture.entries)

    def _result(self, number: int) -> DeliveryResult:
        actions = self._record.actions.get(number, [])
        final = self._record.final(number)
        stored = self._stored(number)
        logs = tuple(entry for entry in self._logs if _logged_for(entry) == number)
        return DeliveryResult(
            message_id=stored.message_id if stored else "",
            order_id=stored.session_id if stored else "",
            sequence_number=number,
            outcome=_outcome(final, logs),
            reason=final.reason if final else "",
            description=final.description if final else "",
            deliveries=1 + sum(1 for item in actions if item.action == "abandon"),
            logs=logs,
        )

    def _stored(self, number: int) -> Any:
        for message in self.broker.completed + self.broker.dead_letters:
            if message.sequence_number == number:
                return message
        for session in self.broker.sessions.values():
            if number in session.deferred:
                return session.deferred[number]
        return None


def _logged_for(entry: dict[str, Any]) -> int | None:
    """Return the sequence number of the message a log line belongs to, if any."""
    if "sequence_number" in entry:
        return int(entry["sequence_number"])
    marked = entry.get(DELIVERY_KEY)
    return int(marked) if marked is not None else None


def _outcome(final: _Settled | None, logs: tuple[dict[str, Any], ...]) -> str:
    if final is None:
        return "unsettled"
    if final.action == "dead_letter":
        return "dead_lettered"
    if final.action == "defer":
        return "deferred"
    events = {entry.get("event") for entry in logs}
    if "message_skipped" in events:
        return "duplicate"
    if "message_ignored" in events:
        return "ignored"
    return "completed"


def _sample_name(family_name: str, family_type: str, requested: str) -> str | None:
    """Return the sample of this family that `requested` names, or None."""
    default_suffix = {"counter": "_total", "histogram": "_count"}.get(family_type, "")
    if requested == family_name:
        return family_name + default_suffix
    for suffix in ("_total", "_count", "_sum", "_bucket"):
        if requested == family_name + suffix:
            return requested
    return None


def _sum_samples(
    samples: Sequence[Any], sample_name: str, labels: dict[str, str]
) -> float:
    total = 0.0
    for sample in samples:
        if sample.name != sample_name:
            continue
        if all(sample.labels.get(key) == value for key, value in labels.items()):
            total += sample.value
    return total


__all__ = ["ConsumerTestHarness", "DeliveryResult", "FAST_SETTINGS", "make_event"]
