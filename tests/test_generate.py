"""Stream generator: valid, deterministic, interleaved, realistic lifecycles."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from consumer.events import validate_event
from consumer.generate import (
    LifecycleOdds,
    generate_stream,
    read_jsonl,
    read_numbered_jsonl,
    write_jsonl,
)


@pytest.fixture(scope="module")
def stream() -> list[dict[str, Any]]:
    return generate_stream(400, seed=11)


def by_order(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    orders: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        orders[event["payload"]["orderId"]].append(event)
    return orders


def test_every_event_validates(stream: list[dict[str, Any]]) -> None:
    for event in stream:
        parsed = validate_event(event)
        assert parsed.event_type == event["eventType"]


def test_same_seed_same_stream(stream: list[dict[str, Any]]) -> None:
    assert generate_stream(400, seed=11) == stream
    assert generate_stream(400, seed=12) != stream


def test_each_order_starts_with_creation(stream: list[dict[str, Any]]) -> None:
    orders = by_order(stream)

    assert len(orders) == 400
    for events in orders.values():
        assert events[0]["eventType"] == "ORDER_CREATED"


def test_timestamps_increase_per_order(stream: list[dict[str, Any]]) -> None:
    for events in by_order(stream).values():
        times = [datetime.fromisoformat(event["timestamp"]) for event in events]
        assert all(earlier < later for earlier, later in itertools.pairwise(times))


def test_orders_are_interleaved(stream: list[dict[str, Any]]) -> None:
    switches = sum(
        1
        for previous, current in itertools.pairwise(stream)
        if previous["payload"]["orderId"] != current["payload"]["orderId"]
    )

    assert switches > len(stream) * 0.8


def test_lifecycle_branches_all_occur(stream: list[dict[str, Any]]) -> None:
    counts = Counter(event["eventType"] for event in stream)

    assert counts["ORDER_CREATED"] == 400
    assert counts["PAYMENT_AUTHORIZED"] == 400
    for event_type in (
        "ORDER_UPDATED",
        "ORDER_CANCELLED",
        "PAYMENT_FAILED",
        "PAYMENT_REFUNDED",
        "ORDER_DELIVERED",
    ):
        assert counts[event_type] > 0, event_type
    assert 0.75 < counts["PAYMENT_CAPTURED"] / 400 < 0.95


def test_money_follows_the_lifecycle(stream: list[dict[str, Any]]) -> None:
    for events in by_order(stream).values():
        total = [e for e in events if "totalAmount" in e["payload"]][-1]
        amounts = {
            e["eventType"]: e["payload"]["amount"]
            for e in events
            if "amount" in e["payload"]
        }
        assert amounts["PAYMENT_AUTHORIZED"] == total["payload"]["totalAmount"]
        captured = amounts.get("PAYMENT_CAPTURED", 0)
        assert captured in (0, amounts["PAYMENT_AUTHORIZED"])
        assert amounts.get("PAYMENT_REFUNDED", 0) <= captured


def test_shipping_needs_capture(stream: list[dict[str, Any]]) -> None:
    for events in by_order(stream).values():
        types = [event["eventType"] for event in events]
        if "ORDER_SHIPPED" in types:
            assert types.index("PAYMENT_CAPTURED") < types.index("ORDER_SHIPPED")
        if "ORDER_CANCELLED" in types:
            assert "ORDER_SHIPPED" not in types


def test_odds_zero_gives_happy_path() -> None:
    odds = LifecycleOdds(update=0, payment_failure=0, cancel_before_capture=0, refund=0)

    events = generate_stream(30, seed=1, odds=odds)

    assert len(events) == 30 * 8
    assert {event["eventType"] for event in events} >= {"ORDER_DELIVERED"}
    assert not {"ORDER_CANCELLED", "PAYMENT_REFUNDED"} & {
        event["eventType"] for event in events
    }


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        LifecycleOdds(refund=1.5)
    with pytest.raises(ValueError, match="must not exceed 1"):
        LifecycleOdds(payment_failure=0.7, cancel_before_capture=0.7)
    with pytest.raises(ValueError, match="orders must be >= 0"):
        generate_stream(-1, seed=1)
    with pytest.raises(ValueError, match="timezone-aware"):
        generate_stream(1, seed=1, start=datetime(2026, 1, 1))


def test_first_order_number_and_start() -> None:
    start = datetime(2030, 5, 1, tzinfo=UTC)

    events = generate_stream(3, seed=2, start=start, first_order_number=7)

    assert {e["payload"]["orderId"] for e in events} == {"ORD-7", "ORD-8", "ORD-9"}
    assert min(e["timestamp"] for e in events).startswith("2030-05-01")


def test_jsonl_round_trip(tmp_path: Path, stream: list[dict[str, Any]]) -> None:
    path = tmp_path / "events.jsonl"

    written = write_jsonl(stream[:50], path)

    assert written == 50
    assert len(path.read_text(encoding="utf-8").splitlines()) == 50
    assert read_jsonl(path) == stream[:50]


def test_read_jsonl_names_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n[2]\n', encoding="utf-8")

    with pytest.raises(ValueError, match=r"bad.jsonl:3: expected a JSON object"):
        read_jsonl(path)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"a": NaN}', "invalid JSON: NaN is not valid JSON"),
        ('{"a": Infinity}', "invalid JSON: Infinity is not valid JSON"),
        ('{"a": -Infinity}', "invalid JSON: -Infinity is not valid JSON"),
        ('{"a": 1e400}', "outside the range of a double"),
        ('{"a": 1, "a": 2}', "duplicate key 'a'"),
        ('{"a":' * 40 + "1" + "}" * 40, "nesting depth 40 exceeds the limit of 32"),
    ],
)
def test_read_jsonl_rejects_what_consumer_rejects(
    tmp_path: Path, line: str, problem: str
) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"a": 1}\n' + line + "\n", encoding="utf-8")

    with pytest.raises(ValueError, match=r"events.jsonl:2: ") as caught:
        read_jsonl(path)

    assert problem in str(caught.value)


def test_read_jsonl_names_non_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')

    with pytest.raises(ValueError, match=r"events.jsonl:2: invalid UTF-8"):
        read_jsonl(path)


def test_read_numbered_jsonl_keeps_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")

    assert read_numbered_jsonl(path) == [(1, {"a": 1}), (3, {"a": 2})]
