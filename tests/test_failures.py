"""Failure semantics against the local broker: bad bodies, retries, poison orders."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import pytest

from consumer.app import ConsumerApp
from consumer.config import Settings
from consumer.dlq import DeadLetterQueue, open_client
from consumer.errors import DeadLetter, PermanentError
from consumer.events import EVENT_TYPES
from consumer.generate import generate_stream
from consumer.routing import EventContext
from consumer.sessions_admin import SessionState, hold_session, read_state, unpark
from tests.conftest import (
    MAX_DELIVERY_COUNT,
    SDK_SOCKET_LEAKS,
    Outgoing,
    Recorder,
    consume,
    dead_letters,
    numbered,
    outgoing_event,
    publish,
    settings_for,
)

pytestmark = SDK_SOCKET_LEAKS


def one_order(order_index: int = 0) -> list[dict[str, Any]]:
    """Return the events of one generated order, in lifecycle order."""
    events = generate_stream(order_index + 1, seed=5)
    order_id = f"ORD-{100_000 + order_index}"
    return [event for event in events if event["payload"]["orderId"] == order_id]


def bad_bodies() -> list[Outgoing]:
    created = one_order()[0]
    missing_customer = json.loads(json.dumps(created))
    del missing_customer["payload"]["customerId"]
    unknown = dict(created, eventType="ORDER_TELEPORTED")
    mismatch = json.loads(json.dumps(created))
    mismatch["payload"]["orderId"] = "ORD-SOMEONE-ELSE"
    return [
        Outgoing(b"\xff\xfe\x00", "S-UTF8", "bad-utf8"),
        Outgoing(b'{"eventType": ', "S-JSON", "bad-json"),
        Outgoing(json.dumps(missing_customer).encode(), "S-SCHEMA", "bad-schema"),
        Outgoing(json.dumps(unknown).encode(), "S-TYPE", "bad-type"),
        Outgoing(json.dumps(mismatch).encode(), "S-MISMATCH", "bad-session"),
    ]


async def test_bad_bodies_reach_dead_letter_queue(broker: Any) -> None:
    good = [outgoing_event(event, f"good-{i}") for i, event in enumerate(one_order())]
    await publish(broker.connection_string, bad_bodies() + good)
    app = ConsumerApp(settings_for(broker.connection_string))
    recorder = Recorder()
    recorder.install(app)

    await consume(app)

    found = {
        item["message_id"]: item
        for item in await dead_letters(broker.connection_string)
    }
    expected = {
        "bad-utf8": "MalformedBody",
        "bad-json": "MalformedBody",
        "bad-schema": "SchemaValidationFailed",
        "bad-type": "UnknownEventType",
        "bad-session": "SessionMismatch",
    }
    assert {key: found[key]["reason"] for key in found} == expected
    assert "customerId" in found["bad-schema"]["description"]
    assert "ORDER_TELEPORTED" in found["bad-type"]["description"]
    assert "ORD-SOMEONE-ELSE" in found["bad-session"]["description"]
    for item in found.values():
        assert item["description"]
    assert recorder.handled[good[0].session_id] == [item.message_id for item in good]


def install_everywhere(app: ConsumerApp, handler: Any) -> None:
    """Register `handler` for every known event type."""
    for event_type in EVENT_TYPES:
        app.router.add_handler(event_type, handler)


class FailingHandler:
    """Fails for the listed message ids: `times` attempts each, or always when None."""

    def __init__(self, failures: dict[str, int | None]) -> None:
        self.failures = dict(failures)
        self.attempts: Counter[str] = Counter()
        self.handled: list[str] = []

    async def __call__(self, event: Any, ctx: EventContext) -> None:
        self.attempts[ctx.message_id] += 1
        remaining = self.failures.get(ctx.message_id, 0)
        if remaining is None:
            raise ConnectionError(f"downstream unavailable for {ctx.message_id}")
        if remaining > 0:
            self.failures[ctx.message_id] = remaining - 1
            raise ConnectionError("downstream busy")
        self.handled.append(ctx.message_id)

    def install(self, app: ConsumerApp) -> None:
        for event_type in EVENT_TYPES:
            app.router.add_handler(event_type, self)


async def test_retried_message_keeps_order(broker: Any) -> None:
    messages = [outgoing_event(e, f"m{i}") for i, e in enumerate(one_order())]
    await publish(broker.connection_string, messages)
    app = ConsumerApp(settings_for(broker.connection_string, retry_attempts=3))
    handler = FailingHandler({"m1": 2})
    handler.install(app)

    await consume(app)

    assert handler.handled == [item.message_id for item in messages]
    assert handler.attempts["m1"] == 3
    assert await dead_letters(broker.connection_string) == []


async def test_abandoned_message_returns_first(broker: Any) -> None:
    messages = [outgoing_event(e, f"m{i}") for i, e in enumerate(one_order())]
    await publish(broker.connection_string, messages)
    # One in-process attempt per delivery, so each failure abandons the message.
    settings = settings_for(
        broker.connection_string, retry_attempts=1, prefetch_count=10
    )
    app = ConsumerApp(settings)
    handler = FailingHandler({"m1": 2})
    handler.install(app)

    await consume(app)

    assert handler.handled == [item.message_id for item in messages]
    assert handler.attempts["m1"] == 3


@pytest.mark.parametrize("policy", ["park", "continue"])
async def test_poison_message_dead_lettered(broker: Any, policy: str) -> None:
    messages = [outgoing_event(e, f"m{i}") for i, e in enumerate(one_order())]
    await publish(broker.connection_string, messages)
    settings = settings_for(
        broker.connection_string, retry_attempts=1, poison_policy=policy
    )
    app = ConsumerApp(settings)
    handler = FailingHandler({"m1": None})
    handler.install(app)

    await consume(app)

    found = await dead_letters(broker.connection_string)
    assert [item["message_id"] for item in found] == ["m1"]
    assert found[0]["reason"] == "MaxRetriesExceeded"
    assert found[0]["description"].startswith("ConnectionError: downstream")
    # One attempt per delivery. A delivery can also end unseen: when a receive
    # times out just as the message arrives, closing the receiver returns it and
    # the broker counts the delivery, which happened on a loaded 2-core machine.
    assert 1 <= handler.attempts["m1"] <= MAX_DELIVERY_COUNT
    later = [item.message_id for item in messages[2:]]
    if policy == "park":
        assert handler.handled == ["m0"]
        assert (
            app.metrics.value(
                "messages_deferred",
                entity="orders.test.events",
                event_type=messages[2].subject or "",
            )
            >= 1
        )
    else:
        assert handler.handled == ["m0", *later]


async def test_handler_signals_dead_letter_at_once(broker: Any) -> None:
    class ShipmentBeforeCapture(PermanentError):
        """Raised for a shipment of an order whose payment was not captured."""

    events = one_order()
    messages = [outgoing_event(e, f"m{i}") for i, e in enumerate(events[:2])]
    await publish(broker.connection_string, messages)
    app = ConsumerApp(settings_for(broker.connection_string, poison_policy="continue"))
    calls: Counter[str] = Counter()

    async def reject(event: Any, ctx: EventContext) -> None:
        calls[ctx.message_id] += 1
        if ctx.message_id == "m0":
            raise DeadLetter("FraudSuspected", "score 0.97")
        raise ShipmentBeforeCapture(f"order {ctx.order_id} is not captured")

    for event_type in EVENT_TYPES:
        app.router.add_handler(event_type, reject)

    await consume(app)

    found = {
        item["message_id"]: item
        for item in await dead_letters(broker.connection_string)
    }
    assert found["m0"]["reason"] == "FraudSuspected"
    assert found["m0"]["description"] == "score 0.97"
    assert found["m1"]["reason"] == "ShipmentBeforeCapture"
    assert calls == Counter({"m0": 1, "m1": 1})


async def test_duplicate_message_id_runs_once(broker: Any) -> None:
    events = one_order()[:2]
    first = outgoing_event(events[0], "dup")
    await publish(
        broker.connection_string, [first, first, outgoing_event(events[1], "m1")]
    )
    app = ConsumerApp(settings_for(broker.connection_string))
    recorder = Recorder()
    recorder.install(app)

    await consume(app)

    assert recorder.handled[first.session_id] == ["dup", "m1"]
    assert (
        app.metrics.value(
            "messages_duplicate",
            entity="orders.test.events",
            event_type=first.subject or "",
        )
        == 1
    )


async def test_stop_lets_in_flight_handler_finish(broker: Any) -> None:
    messages = numbered(generate_stream(4, seed=3))
    await publish(broker.connection_string, messages)
    app = ConsumerApp(settings_for(broker.connection_string, shutdown_grace_s=5.0))
    started = asyncio.Event()
    finished: list[str] = []

    async def slow(event: Any, ctx: EventContext) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(ctx.message_id)

    for event_type in EVENT_TYPES:
        app.router.add_handler(event_type, slow)
    run = asyncio.create_task(app.run())
    await asyncio.wait_for(started.wait(), timeout=10)
    app.stop()
    await asyncio.wait_for(run, timeout=10)

    assert 1 <= len(finished) <= 4
    assert (
        app.metrics.value(
            "messages_abandoned",
            entity="orders.test.events",
            event_type=messages[0].subject or "",
        )
        == 0
    )


class FailOnce:
    """A handler that raises `DeadLetter` on its first call for `message_id` only."""

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        self.failed = False
        self.handled: list[str] = []

    async def __call__(self, event: Any, ctx: EventContext) -> None:
        if ctx.message_id == self.message_id and not self.failed:
            self.failed = True
            raise DeadLetter("PaymentRejected", "card issuer declined")
        self.handled.append(ctx.message_id)


async def read_session_state(settings: Settings, order_id: str) -> SessionState:
    async with open_client(settings) as client:
        async with hold_session(client, settings, order_id) as receiver:
            return await read_state(receiver)


async def test_unpark_runs_copy_then_deferred(broker: Any) -> None:
    messages = [outgoing_event(e, f"m{i}") for i, e in enumerate(one_order()[:4])]
    order_id = messages[0].session_id
    await publish(broker.connection_string, messages)
    settings = settings_for(broker.connection_string, poison_policy="park")
    handler = FailOnce("m1")
    app = ConsumerApp(settings)
    install_everywhere(app, handler)
    await consume(app)
    parked = await read_session_state(settings, order_id)

    async with open_client(settings) as client:
        result = await unpark(client, settings, order_id)
    requested = await read_session_state(settings, order_id)
    resumed = ConsumerApp(settings)
    install_everywhere(resumed, handler)
    await consume(resumed)
    final = await read_session_state(settings, order_id)

    assert parked.checkpoint.parked is not None
    assert len(parked.checkpoint.deferred_sequence_numbers) == 2
    assert result.unparked
    assert requested.unpark is not None
    # The copy of m1 runs first, then the messages deferred while parked.
    assert handler.handled == ["m0", "m1", "m2", "m3"]
    assert final.checkpoint.parked is None
    assert final.checkpoint.deferred_sequence_numbers == ()
    assert final.unpark is None
    assert await dead_letters(broker.connection_string) == []


async def test_resubmit_behind_checkpoint_is_out_of_order(broker: Any) -> None:
    messages = [outgoing_event(e, f"m{i}") for i, e in enumerate(one_order()[:3])]
    await publish(broker.connection_string, messages)
    settings = settings_for(broker.connection_string, poison_policy="continue")
    handler = FailOnce("m1")
    app = ConsumerApp(settings)
    install_everywhere(app, handler)
    await consume(app)

    # Send the dead-lettered m1 back with a plain sender, as a script would.
    async with open_client(settings) as client:
        [record] = await DeadLetterQueue(client, settings).peek()
        async with client.get_queue_sender(settings.entity_name) as sender:
            await sender.send_messages(record.resubmit_copy({}))
    again = ConsumerApp(settings)
    install_everywhere(again, handler)
    await consume(again)

    assert handler.handled == ["m0", "m2"]
    found = await dead_letters(broker.connection_string)
    reasons = sorted((item["message_id"], item["reason"]) for item in found)
    assert reasons == [("m1", "OutOfOrder"), ("m1", "PaymentRejected")]
    [late] = [item for item in found if item["reason"] == "OutOfOrder"]
    assert str(record.sequence_number) in late["description"]
