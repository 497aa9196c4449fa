"""Event models and body parsing: valid events, each rejection reason, limits."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.errors import ConsumerError
from consumer.events import (
    EVENT_TYPES,
    MAX_DESCRIPTION_CHARS,
    CustomerNotified,
    EventRejected,
    OrderCreated,
    event_to_json,
    json_depth,
    parse_event,
)

CREATED: dict[str, Any] = {
    "eventType": "ORDER_CREATED",
    "timestamp": "2026-11-27T08:45:11.786559Z",
    "version": "1.0",
    "payload": {
        "orderId": "ORD-1",
        "customerId": "CUST-1",
        "items": [
            {"productId": "PROD-1", "quantity": 2, "price": 100.68},
            {"productId": "PROD-2", "quantity": 4, "price": 21.98},
        ],
        "totalAmount": 289.28,
        "shippingAddress": {"street": "1 Main St", "city": "Osaka", "country": "JP"},
    },
    "metadata": {"source": "pos", "correlationId": "corr-1"},
}


def created(**changes: Any) -> dict[str, Any]:
    """Return a copy of CREATED with `a__b__0` paths set (deleted when given `...`)."""
    body = copy.deepcopy(CREATED)
    for path, value in changes.items():
        *parents, last = path.split("__")
        target: Any = body
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is ...:
            del target[last]
        elif last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value
    return body


def rejection(body: bytes | str | dict[str, Any], **limits: int) -> EventRejected:
    if isinstance(body, dict):
        body = json.dumps(body)
    with pytest.raises(EventRejected) as caught:
        parse_event(body, **limits)
    return caught.value


def test_valid_order_created_is_typed() -> None:
    event = parse_event(json.dumps(CREATED).encode())

    assert isinstance(event, OrderCreated)
    assert event.order_id == "ORD-1"
    assert event.payload.items[1].quantity == 4
    assert event.payload.shipping_address.country == "JP"
    assert event.metadata.correlation_id == "corr-1"
    assert event.timestamp.utcoffset() is not None


def test_event_types_cover_every_type() -> None:
    expected = {
        "ORDER_CREATED",
        "ORDER_UPDATED",
        "ORDER_CANCELLED",
        "PAYMENT_AUTHORIZED",
        "PAYMENT_CAPTURED",
        "PAYMENT_FAILED",
        "PAYMENT_REFUNDED",
        "FULFILLMENT_STARTED",
        "ORDER_SHIPPED",
        "ORDER_DELIVERED",
        "CUSTOMER_NOTIFIED",
    }

    assert set(EVENT_TYPES) == expected
    for name, model in EVENT_TYPES.items():
        assert model.model_fields["event_type"].default == name


def test_extra_fields_are_kept_and_serialized() -> None:
    body = created(payload__giftWrap=True, loyaltyTier="gold")
    body["payload"]["items"][0]["colour"] = "red"

    event = parse_event(json.dumps(body))
    round_trip = json.loads(event_to_json(event))

    assert round_trip["loyaltyTier"] == "gold"
    assert round_trip["payload"]["giftWrap"] is True
    assert round_trip["payload"]["items"][0]["colour"] == "red"
    assert round_trip == body


def test_construct_by_field_name() -> None:
    event = CustomerNotified.model_validate(
        {
            "timestamp": "2026-11-27T08:45:11+01:00",
            "version": "1.2",
            "payload": {
                "order_id": "ORD-1",
                "customer_id": "CUST-1",
                "channel": "email",
                "template": "order_confirmation",
            },
            "metadata": {"source": "web", "correlation_id": "corr-1"},
        }
    )

    body = json.loads(event_to_json(event))
    assert body["eventType"] == "CUSTOMER_NOTIFIED"
    assert body["payload"]["customerId"] == "CUST-1"
    assert body["metadata"]["correlationId"] == "corr-1"


def test_rejection_is_consumer_error() -> None:
    error = rejection(b"not json")

    assert isinstance(error, ConsumerError)
    assert error.reason == "MalformedBody"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\xff\xfe{}", "not valid UTF-8"),
        ("\ud800", "not valid UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "got an array"),
        (b'"text"', "got a string"),
        (b"42", "got a number"),
        (b"null", "got null"),
        (b'{"a": NaN}', "NaN"),
        (b'{"a": Infinity}', "Infinity"),
        (b'{"a": -Infinity}', "-Infinity"),
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
    ],
)
def test_malformed_bodies(body: bytes | str, fragment: str) -> None:
    error = rejection(body)

    assert error.reason == "MalformedBody"
    assert fragment in error.description


def test_body_too_large_rejected_before_parsing() -> None:
    body = json.dumps(created(payload__note="x" * 2000))

    error = rejection(body, max_bytes=1024)

    assert error.reason == "MalformedBody"
    assert "larger than 1024 bytes" in error.description
    assert "xxxx" not in error.description


def test_nesting_depth_limit() -> None:
    nested: Any = 1
    for _ in range(10):
        nested = [nested]

    error = rejection(created(payload__deep=nested), max_depth=8)
    accepted = parse_event(json.dumps(created(payload__deep=nested)), max_depth=12)

    assert error.reason == "MalformedBody"
    assert "depth 12 exceeds the limit of 8" in error.description
    assert accepted.payload.deep == nested  # type: ignore[attr-defined]


def test_huge_nesting_is_cheap_to_reject() -> None:
    error = rejection("[" * 200_000)

    assert error.reason == "MalformedBody"
    assert "200000" in error.description


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("{}", 1),
        ('{"a": [[{}]]}', 4),
        ('{"a": "[[[{{{"}', 1),
        ('{"a": "quote \\" then [["}', 1),
        ('{"a": "backslash \\\\", "b": [[1]]}', 3),
        ('"\\"[[[[', 0),
    ],
)
def test_json_depth_ignores_strings(text: str, depth: int) -> None:
    assert json_depth(text) == depth


def test_unknown_event_type_lists_known_types() -> None:
    error = rejection(created(eventType="ORDER_TELEPORTED"))

    assert error.reason == "UnknownEventType"
    assert "'ORDER_TELEPORTED'" in error.description
    assert "ORDER_CREATED" in error.description
    assert "CUSTOMER_NOTIFIED" in error.description


def test_unknown_event_type_is_not_echoed_in_full() -> None:
    error = rejection(created(eventType="X" * 10_000))

    assert error.reason == "UnknownEventType"
    assert len(error.description) < 1000


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"eventType": ...}, "eventType: Field required"),
        ({"eventType": 7}, "eventType: Input should be a valid string"),
        ({"timestamp": "2026-11-27T08:45:11"}, "timestamp: Input should have timezone"),
        ({"timestamp": "yesterday"}, "timestamp: "),
        ({"version": "2.0"}, "version: Value error, version '2.0' is not supported"),
        ({"version": "one"}, "supported versions: 1.x"),
        ({"version": 1}, "version: Input should be a valid string"),
        ({"payload__orderId": ""}, "payload.orderId: String should have at least 1"),
        ({"payload__orderId": "ORD 1"}, "payload.orderId: String should match"),
        (
            {"payload__orderId": "O" * 129},
            "payload.orderId: String should have at most",
        ),
        ({"payload__orderId": 5}, "payload.orderId: Input should be a valid string"),
        ({"payload__customerId": ...}, "payload.customerId: Field required"),
        ({"payload__items": []}, "payload.items: List should have at least 1 item"),
        (
            {"payload__items__0__quantity": 0},
            "payload.items.0.quantity: Input should be greater than or equal to 1",
        ),
        ({"payload__items__0__quantity": 1.5}, "payload.items.0.quantity: Input"),
        ({"payload__items__0__quantity": "2"}, "payload.items.0.quantity: Input"),
        ({"payload__items__1__price": -0.01}, "payload.items.1.price: Input should be"),
        ({"payload__items__1__price": "21.98"}, "payload.items.1.price: Input"),
        ({"payload__totalAmount": 289.30}, "does not match the sum"),
        ({"payload__totalAmount": -1}, "payload.totalAmount: Input should be"),
        (
            {"payload__shippingAddress__country": "XX"},
            "payload.shippingAddress.country: Value error, country 'XX' is not",
        ),
        ({"payload__shippingAddress__country": "jp"}, "not an ISO 3166-1 alpha-2"),
        ({"payload__shippingAddress__city": "  "}, "payload.shippingAddress.city"),
        ({"metadata__correlationId": ...}, "metadata.correlationId: Field required"),
        ({"metadata": ...}, "metadata: Field required"),
        ({"payload": ...}, "payload: Field required"),
    ],
)
def test_schema_failures_name_the_field(changes: dict[str, Any], expected: str) -> None:
    error = rejection(created(**changes))

    assert error.reason == "SchemaValidationFailed"
    assert expected in error.description


def test_total_within_one_cent_is_accepted() -> None:
    event = parse_event(json.dumps(created(payload__totalAmount=289.29)))

    assert event.payload.total_amount == 289.29


@pytest.mark.parametrize(
    ("event_type", "payload", "expected"),
    [
        (
            "PAYMENT_CAPTURED",
            {"paymentId": "PAY-1", "amount": 0, "currency": "EUR"},
            "payload.amount: Input should be greater than 0",
        ),
        (
            "PAYMENT_REFUNDED",
            {"paymentId": "PAY-1", "amount": 5.0, "currency": "euro"},
            "payload.currency: String should match",
        ),
        ("ORDER_DELIVERED", {"deliveredAt": "2026-11-27T09:00:00"}, "timezone"),
        ("ORDER_SHIPPED", {"carrier": "DHL"}, "payload.trackingNumber: Field"),
        (
            "ORDER_UPDATED",
            {
                "items": [{"productId": "P", "quantity": 1, "price": 2}],
                "totalAmount": 3,
            },
            "does not match the sum",
        ),
    ],
)
def test_payload_rules_per_type(
    event_type: str, payload: dict[str, Any], expected: str
) -> None:
    body = created(eventType=event_type)
    body["payload"] = {"orderId": "ORD-1", **payload}

    error = rejection(body)

    assert error.reason == "SchemaValidationFailed"
    assert expected in error.description


def test_description_lists_several_fields() -> None:
    body = created(payload__items__0__quantity=0, metadata__source="")

    description = rejection(body).description

    assert "payload.items.0.quantity" in description
    assert "metadata.source" in description


def test_description_is_bounded() -> None:
    body = created()
    body["payload"]["items"] = [
        {"productId": "", "quantity": 0, "price": -1} for _ in range(200)
    ]

    error = rejection(body)

    assert error.reason == "SchemaValidationFailed"
    assert len(error.description) <= MAX_DESCRIPTION_CHARS
    assert error.description.endswith("(truncated)")


def test_description_does_not_echo_input() -> None:
    secret_like = "SharedAccessKey=abc123"
    body = created(payload__shippingAddress__country=secret_like)

    error = rejection(body)

    assert secret_like not in error.description


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_reject(body: bytes) -> None:
    try:
        parse_event(body)
    except EventRejected as error:
        assert error.reason in ("MalformedBody", "SchemaValidationFailed")


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.sampled_from(sorted(EVENT_TYPES)))
def test_any_payload_parses_or_rejects(payload: Any, event_type: str) -> None:
    body = created(eventType=event_type, payload=payload)

    try:
        event = parse_event(json.dumps(body))
    except EventRejected as error:
        assert error.reason != "UnknownEventType"
        assert len(error.description) <= MAX_DESCRIPTION_CHARS
    else:
        assert event.event_type == event_type
