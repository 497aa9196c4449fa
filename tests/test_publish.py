"""Publisher helpers: message properties, ids, input errors, batching and retries."""

from __future__ import annotations

import json
from typing import Any

import pytest
from azure.servicebus import ServiceBusMessage

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
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    return generate_stream(20, seed=4)


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

    assert ids == [message_id_for(event) for event in generate_stream(20, seed=4)]
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
