"""Publisher helpers: message properties, ids, input errors, batching and retries."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    ServiceBusMessage,
    ServiceBusReceivedMessage,
)
from azure.servicebus.aio import ServiceBusClient
from azure.servicebus.exceptions import (
    OperationTimeoutError,
    ServiceBusAuthorizationError,
    ServiceBusServerBusyError,
)

from consumer.config import Settings
from consumer.errors import TransportError
from consumer.events import validate_event
from consumer.generate import generate_stream
from consumer.publish import (
    CONTENT_TYPE,
    InvalidEventError,
    SendRetryPolicy,
    build_message,
    build_messages,
    build_raw_message,
    message_id_for,
    publish_events,
    publish_events_sync,
    publish_messages,
    publish_messages_sync,
    publish_raw,
    send_batched_async,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    return generate_stream(6, seed=4)


def body_of(message: ServiceBusMessage) -> dict[str, Any]:
    return json.loads(b"".join(message.body))


def test_message_properties(events: list[dict[str, Any]]) -> None:
    event = events[0]

    message = build_message(event, traceparent=TRACEPARENT)

    assert message.session_id == event["payload"]["orderId"]
    assert message.subject == event["eventType"]
    assert message.correlation_id == event["metadata"]["correlationId"]
    assert message.content_type == CONTENT_TYPE
    assert message.message_id == message_id_for(event)
    assert message.application_properties == {"traceparent": TRACEPARENT}
    assert body_of(message) == event


def test_no_traceparent_no_properties(events: list[dict[str, Any]]) -> None:
    message = build_message(events[0])

    assert not message.application_properties


def test_given_message_id_wins(events: list[dict[str, Any]]) -> None:
    message = build_message(events[0], message_id="my-id")

    assert message.message_id == "my-id"


def test_message_id_is_deterministic(events: list[dict[str, Any]]) -> None:
    ids = [message_id_for(event) for event in events]
    reordered = {key: events[0][key] for key in reversed(list(events[0]))}

    assert ids == [message_id_for(event) for event in generate_stream(6, seed=4)]
    assert len(set(ids)) == len(ids)
    assert message_id_for(reordered) == ids[0]
    assert len(ids[0]) == 32


def test_typed_event_gets_same_id(events: list[dict[str, Any]]) -> None:
    for event in events[:10]:
        typed = validate_event(event)
        assert message_id_for(typed) == message_id_for(event)
        assert build_message(typed).session_id == event["payload"]["orderId"]


def test_missing_correlation_id_is_allowed(events: list[dict[str, Any]]) -> None:
    event = dict(events[0], metadata={"source": "pos"})

    message = build_message(event)

    assert message.correlation_id is None


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"payload": {"customerId": "C"}}, "payload.orderId is missing"),
        ({"payload": {"orderId": ""}}, "payload.orderId is missing"),
        ({"payload": {"orderId": 42}}, "payload.orderId is missing"),
        ({"payload": None}, "payload is missing"),
        ({"eventType": None}, "eventType is missing"),
    ],
)
def test_bad_input_raises(
    events: list[dict[str, Any]], change: dict[str, Any], fragment: str
) -> None:
    event = dict(events[0], **change)

    with pytest.raises(InvalidEventError) as caught:
        build_message(event)

    assert fragment in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_long_order_id_raises(events: list[dict[str, Any]]) -> None:
    event = dict(events[0], payload=dict(events[0]["payload"], orderId="O" * 129))

    with pytest.raises(InvalidEventError, match="orderId is 129 characters long"):
        build_message(event)


def test_order_id_at_limit_builds(events: list[dict[str, Any]]) -> None:
    event = dict(events[0], payload=dict(events[0]["payload"], orderId="O" * 128))

    assert build_message(event).session_id == "O" * 128


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_non_finite_number_raises(events: list[dict[str, Any]], number: float) -> None:
    event = dict(events[0], extra={"amount": number})

    with pytest.raises(InvalidEventError, match="NaN or an infinite number"):
        build_message(event)


def test_bad_input_names_index(events: list[dict[str, Any]]) -> None:
    broken = dict(events[3], payload={})

    with pytest.raises(InvalidEventError, match=r"^event 3: payload.orderId"):
        build_messages([*events[:3], broken, *events[4:]])


def test_non_mapping_rejected() -> None:
    with pytest.raises(InvalidEventError, match="must be a JSON object"):
        build_message(["not", "an", "event"])  # type: ignore[arg-type]


def test_raw_message_keeps_body() -> None:
    message = build_raw_message(b"\xff not json", "ORD-9", subject="X")

    assert message.session_id == "ORD-9"
    assert b"".join(message.body) == b"\xff not json"
    assert message.subject == "X"
    assert message.content_type == CONTENT_TYPE
    assert message.message_id == build_raw_message(b"\xff not json", "ORD-9").message_id
    assert message.message_id != build_raw_message(b"other", "ORD-9").message_id


def test_retry_backoff_is_capped() -> None:
    policy = SendRetryPolicy(attempts=10, backoff_s=0.5, max_backoff_s=3.0)

    delays = [policy.delay_s(attempt) for attempt in range(1, 7)]

    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


# Against the local broker ------------------------------------------------------------

EVENTS_QUEUE = "publish.events"
RAW_QUEUE = "publish.raw"
RETRY_QUEUE = "publish.retry"
SYNC_QUEUE = "publish.sync"
SESSIONS_QUEUE = "publish.sessions"


@pytest.fixture(scope="module")
def broker() -> Iterator[Any]:
    from localbus.testing import run_broker

    queues = [EVENTS_QUEUE, RAW_QUEUE, RETRY_QUEUE, SYNC_QUEUE, SESSIONS_QUEUE]
    with run_broker(entities=queues) as running:
        yield running


def settings_for(broker: Any, queue: str) -> Settings:
    return Settings(connection_string=broker.connection_string, entity=queue)


async def receive_sessions(
    connection_string: str,
    queue: str,
    expected: Mapping[str, int],
    *,
    check_empty: bool = False,
) -> dict[str, list[ServiceBusReceivedMessage]]:
    """Receive and complete `expected[session]` messages of each session.

    With `check_empty`, then check that no session has messages left (about 2 s).
    Opening and closing a session receiver took about 1 s per session in local runs,
    so tests keep the number of sessions small.
    """
    received: dict[str, list[ServiceBusReceivedMessage]] = {}
    async with ServiceBusClient.from_connection_string(connection_string) as client:
        for session_id, count in expected.items():
            receiver = client.get_queue_receiver(queue, session_id=session_id)
            async with receiver:
                messages: list[ServiceBusReceivedMessage] = []
                while len(messages) < count:
                    batch = await receiver.receive_messages(
                        max_message_count=count - len(messages), max_wait_time=5
                    )
                    assert batch, f"session {session_id}: {len(messages)}/{count}"
                    for message in batch:
                        await receiver.complete_message(message)
                    messages.extend(batch)
                received[session_id] = messages
        if not check_empty:
            return received
        leftover = client.get_queue_receiver(
            queue, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=1
        )
        try:
            async with leftover:
                extra = await leftover.receive_messages(max_wait_time=1)
        except OperationTimeoutError:
            extra = []  # no session has messages
        assert [message.session_id for message in extra] == []
    return received


def per_session(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    sessions: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        sessions[event["payload"]["orderId"]].append(event)
    return sessions


async def test_publish_keeps_order_and_properties(
    broker: Any, events: list[dict[str, Any]]
) -> None:
    published = events[:40]
    messages = build_messages(published, traceparent=TRACEPARENT)
    settings = settings_for(broker, EVENTS_QUEUE)

    result = await publish_messages(settings, messages, max_batch_bytes=2048)

    assert result.messages == len(published)
    assert result.batches > 5
    assert result.retries == 0
    sessions = per_session(published)
    expected = {order_id: len(items) for order_id, items in sessions.items()}
    received = await receive_sessions(
        broker.connection_string, EVENTS_QUEUE, expected, check_empty=True
    )
    for order_id, items in sessions.items():
        got = received[order_id]
        assert [body_of_received(m) for m in got] == items
        assert [m.message_id for m in got] == [message_id_for(e) for e in items]
        assert [m.subject for m in got] == [e["eventType"] for e in items]
        for message in got:
            assert message.session_id == order_id
            assert message.content_type == CONTENT_TYPE
            assert message.correlation_id == items[0]["metadata"]["correlationId"]
            properties = message.application_properties or {}
            assert properties.get(b"traceparent") == TRACEPARENT.encode()


def of_orders(events: list[dict[str, Any]], orders: int) -> list[dict[str, Any]]:
    """Return the events of the first `orders` orders, in stream order."""
    chosen = list(per_session(events))[:orders]
    return [event for event in events if event["payload"]["orderId"] in chosen]


def body_of_received(message: ServiceBusReceivedMessage) -> dict[str, Any]:
    return json.loads(b"".join(message.body))


async def test_publish_raw_bodies(broker: Any) -> None:
    bodies = [("ORD-raw-1", b"\xff\xfe"), ("ORD-raw-1", "{"), ("ORD-raw-2", b"[]")]

    count = await publish_raw(settings_for(broker, RAW_QUEUE), bodies)

    assert count == 3
    received = await receive_sessions(
        broker.connection_string, RAW_QUEUE, {"ORD-raw-1": 2, "ORD-raw-2": 1}
    )
    assert [b"".join(m.body) for m in received["ORD-raw-1"]] == [b"\xff\xfe", b"{"]
    assert [b"".join(m.body) for m in received["ORD-raw-2"]] == [b"[]"]


class FlakySender:
    """Wrapper of a real sender whose first `failures` sends raise `error` instead."""

    def __init__(self, sender: Any, failures: int, error: Exception) -> None:
        self._sender = sender
        self._failures = failures
        self._error = error
        self.sends = 0

    async def create_message_batch(self, max_size_in_bytes: int | None = None) -> Any:
        return await self._sender.create_message_batch(max_size_in_bytes)

    async def send_messages(self, batch: Any) -> None:
        self.sends += 1
        if self._failures:
            self._failures -= 1
            raise self._error
        await self._sender.send_messages(batch)


async def test_transient_send_errors_are_retried(
    broker: Any, events: list[dict[str, Any]]
) -> None:
    two_orders = of_orders(events, 2)
    messages = build_messages(two_orders)
    retry = SendRetryPolicy(attempts=4, backoff_s=0.01, max_backoff_s=0.02)
    busy = ServiceBusServerBusyError(message="server busy")

    async with ServiceBusClient.from_connection_string(broker.connection_string) as c:
        async with c.get_queue_sender(RETRY_QUEUE) as sender:
            flaky = FlakySender(sender, failures=3, error=busy)
            result = await send_batched_async(flaky, messages, retry=retry)  # type: ignore[arg-type]

    assert result.retries == 3
    assert result.messages == len(two_orders)
    assert flaky.sends == 4
    expected = {k: len(v) for k, v in per_session(two_orders).items()}
    received = await receive_sessions(
        broker.connection_string, RETRY_QUEUE, expected, check_empty=True
    )
    assert sum(len(v) for v in received.values()) == len(two_orders)


async def test_retries_are_bounded(broker: Any, events: list[dict[str, Any]]) -> None:
    retry = SendRetryPolicy(attempts=2, backoff_s=0.01, max_backoff_s=0.01)
    busy = ServiceBusServerBusyError(message="server busy")

    async with ServiceBusClient.from_connection_string(broker.connection_string) as c:
        async with c.get_queue_sender(RETRY_QUEUE) as sender:
            flaky = FlakySender(sender, failures=5, error=busy)
            with pytest.raises(ServiceBusServerBusyError):
                await send_batched_async(flaky, build_messages(events[:2]), retry=retry)  # type: ignore[arg-type]

    assert flaky.sends == 2


async def test_permanent_send_error_not_retried(
    broker: Any, events: list[dict[str, Any]]
) -> None:
    denied = ServiceBusAuthorizationError(message="not authorized")

    async with ServiceBusClient.from_connection_string(broker.connection_string) as c:
        async with c.get_queue_sender(RETRY_QUEUE) as sender:
            flaky = FlakySender(sender, failures=1, error=denied)
            with pytest.raises(ServiceBusAuthorizationError):
                await send_batched_async(flaky, build_messages(events[:2]))  # type: ignore[arg-type]

    assert flaky.sends == 1


def test_sync_publish_returns_count(broker: Any, events: list[dict[str, Any]]) -> None:
    one_order = of_orders(events, 1)

    count = publish_events_sync(settings_for(broker, SYNC_QUEUE), one_order)

    assert count == len(one_order)
    expected = {k: len(v) for k, v in per_session(one_order).items()}
    received = asyncio.run(
        receive_sessions(broker.connection_string, SYNC_QUEUE, expected)
    )
    assert sum(len(v) for v in received.values()) == len(one_order)


def test_oversized_message_sends_nothing(
    broker: Any, events: list[dict[str, Any]]
) -> None:
    first = events[0]
    big = dict(events[1], note="x" * 4000)
    messages = build_messages([first, big])

    with pytest.raises(InvalidEventError, match="does not fit in an empty batch"):
        publish_messages_sync(
            settings_for(broker, SYNC_QUEUE), messages, max_batch_bytes=2048
        )

    # Expect no message of the first order, then check that no session has any.
    received = asyncio.run(
        receive_sessions(
            broker.connection_string,
            SYNC_QUEUE,
            {first["payload"]["orderId"]: 0},
            check_empty=True,
        )
    )
    assert sum(len(v) for v in received.values()) == 0


def test_message_too_large_for_batch(broker: Any, events: list[dict[str, Any]]) -> None:
    big = dict(events[0], note="x" * 4000)
    messages = build_messages([big])

    with pytest.raises(InvalidEventError, match="does not fit in an empty batch"):
        publish_messages_sync(
            settings_for(broker, SYNC_QUEUE), messages, max_batch_bytes=2048
        )


async def test_unknown_queue_is_transport_error(
    broker: Any, events: list[dict[str, Any]]
) -> None:
    settings = settings_for(broker, "no.such.queue")
    retry = SendRetryPolicy(attempts=2, backoff_s=0.01, max_backoff_s=0.01)

    with pytest.raises(TransportError) as caught:
        await publish_events(settings, events[:1], retry=retry)

    assert "no.such.queue" in str(caught.value)
    assert "SAS_KEY_VALUE" not in str(caught.value)


async def test_one_session_per_batch(broker: Any, events: list[dict[str, Any]]) -> None:
    messages = build_messages(events)
    runs = 1 + sum(
        1
        for previous, current in itertools.pairwise(messages)
        if previous.session_id != current.session_id
    )
    settings = settings_for(broker, SESSIONS_QUEUE)

    result = await publish_messages(settings, messages, one_session_per_batch=True)

    assert result.messages == len(messages)
    assert result.batches == runs
