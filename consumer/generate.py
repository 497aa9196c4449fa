"""Generation of realistic, reproducible order event streams for tests and demos.

Each order follows the lifecycle below. The probabilities in `LifecycleOdds` default to
the rates measured on a 500-order stream from another producer (4,008 events):

    ORDER_CREATED
    ORDER_UPDATED                                    (update, 0.25)
    CUSTOMER_NOTIFIED order_confirmation
    PAYMENT_AUTHORIZED amount = totalAmount
    then one of
      PAYMENT_FAILED, CUSTOMER_NOTIFIED payment_update,
      ORDER_CANCELLED reason payment_failed          (payment_failure, 0.10)
      ORDER_CANCELLED out_of_stock | customer_request,
      CUSTOMER_NOTIFIED order_cancellation           (cancel_before_capture, 0.04)
      PAYMENT_CAPTURED amount = authorized amount, FULFILLMENT_STARTED, ORDER_SHIPPED,
      CUSTOMER_NOTIFIED shipping_update, ORDER_DELIVERED   (the remaining 0.86)
    after delivery: PAYMENT_REFUNDED of the full captured amount,
      CUSTOMER_NOTIFIED payment_update               (refund, 0.05)

Consecutive events of one order are 1 to 900 seconds apart. Orders start at random
offsets and the stream is sorted by timestamp, so orders interleave while each order's
events stay in lifecycle order. The same arguments always give the same stream.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from consumer.events import DEFAULT_MAX_DEPTH, json_depth, loads_strict

DEFAULT_START = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
EVENT_VERSION = "1.0"

SOURCES = ("web_checkout", "mobile_app", "pos", "partner_api")
CURRENCIES = ("EUR", "USD", "GBP", "JPY")
CARRIERS = ("DHL", "UPS", "PostNL", "Yamato")
CHANNELS = ("email", "sms", "push")
CANCEL_REASONS = ("out_of_stock", "customer_request")
FAILURE_REASONS = ("insufficient_funds", "card_declined")
CITIES = {
    "US": ("Springfield", "Portland", "Austin"),
    "AT": ("Vienna", "Graz"),
    "FR": ("Lyon", "Paris"),
    "GB": ("Leeds", "Bristol"),
    "PT": ("Porto", "Lisbon"),
    "JP": ("Osaka", "Sapporo"),
    "EE": ("Tartu", "Tallinn"),
    "DE": ("Leipzig", "Hamburg"),
}
STREETS = ("Main St", "Station Rd", "Elm Rd", "Ringstrasse", "Harbour Way", "Mill Ln")


@dataclass(frozen=True)
class LifecycleOdds:
    """Probabilities of the optional lifecycle branches, each between 0 and 1.

    `payment_failure` and `cancel_before_capture` are taken from one draw after the
    authorization, so their sum must not exceed 1.
    """

    update: float = 0.25
    payment_failure: float = 0.10
    cancel_before_capture: float = 0.04
    refund: float = 0.05

    def __post_init__(self) -> None:
        for name in ("update", "payment_failure", "cancel_before_capture", "refund"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.payment_failure + self.cancel_before_capture > 1:
            raise ValueError(
                "payment_failure + cancel_before_capture must not exceed 1, got "
                f"{self.payment_failure + self.cancel_before_capture}"
            )


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _random_items(rng: random.Random) -> list[dict[str, Any]]:
    return [
        {
            "productId": f"PROD-{rng.randint(100, 999)}",
            "quantity": rng.randint(1, 4),
            "price": rng.randint(500, 25_000) / 100,
        }
        for _ in range(rng.randint(1, 5))
    ]


def _total(items: list[dict[str, Any]]) -> float:
    # Sum in cents so that the total has exactly two decimals, like the prices.
    cents = sum(item["quantity"] * round(item["price"] * 100) for item in items)
    return cents / 100


class _OrderBuilder:
    """Scratch state while one order's events are drawn."""

    def __init__(self, rng: random.Random, order_id: str, started_at: datetime) -> None:
        self.rng = rng
        self.order_id = order_id
        self.clock = started_at
        self.customer_id = f"CUST-{rng.randint(1000, 9999)}"
        self.metadata = {
            "source": rng.choice(SOURCES),
            "correlationId": f"corr-{rng.getrandbits(48):012x}",
        }
        self.events: list[dict[str, Any]] = []

    def emit(self, event_type: str, **fields: Any) -> str:
        """Append an event one step after the previous one; return its timestamp."""
        if self.events:
            self.clock += timedelta(seconds=self.rng.uniform(1, 900))
        timestamp = _format_time(self.clock)
        self.events.append(
            {
                "eventType": event_type,
                "timestamp": timestamp,
                "version": EVENT_VERSION,
                "payload": {"orderId": self.order_id, **fields},
                "metadata": dict(self.metadata),
            }
        )
        return timestamp

    def notify(self, template: str) -> None:
        self.emit(
            "CUSTOMER_NOTIFIED",
            customerId=self.customer_id,
            channel=self.rng.choice(CHANNELS),
            template=template,
        )

    def create(self, odds: LifecycleOdds) -> float:
        """Emit the creation (and maybe an update); return the final total."""
        country = self.rng.choice(sorted(CITIES))
        items = _random_items(self.rng)
        address = {
            "street": f"{self.rng.randint(1, 400)} {self.rng.choice(STREETS)}",
            "city": self.rng.choice(CITIES[country]),
            "country": country,
        }
        self.emit(
            "ORDER_CREATED",
            customerId=self.customer_id,
            items=items,
            totalAmount=_total(items),
            shippingAddress=address,
        )
        if self.rng.random() < odds.update:
            items = [*items[:-1], *_random_items(self.rng)[:2]]
            self.emit("ORDER_UPDATED", items=items, totalAmount=_total(items))
        return _total(items)

    def capture_and_ship(self, amount: float, currency: str, payment_id: str) -> None:
        money = {"paymentId": payment_id, "amount": amount, "currency": currency}
        self.emit("PAYMENT_CAPTURED", **money)
        self.emit("FULFILLMENT_STARTED", warehouseId=f"WH-{self.rng.randint(1, 9)}")
        self.emit(
            "ORDER_SHIPPED",
            carrier=self.rng.choice(CARRIERS),
            trackingNumber=f"TRK{self.rng.randint(10**9, 10**10 - 1)}",
        )
        self.notify("shipping_update")
        delivered_at = self.emit("ORDER_DELIVERED")
        self.events[-1]["payload"]["deliveredAt"] = delivered_at

    def build(self, odds: LifecycleOdds) -> list[dict[str, Any]]:
        """Draw the whole lifecycle of the order."""
        total = self.create(odds)
        self.notify("order_confirmation")
        payment_id = f"PAY-{self.rng.randint(10**7, 10**8 - 1)}"
        currency = self.rng.choice(CURRENCIES)
        money = {"paymentId": payment_id, "amount": total, "currency": currency}
        self.emit("PAYMENT_AUTHORIZED", **money)

        outcome = self.rng.random()
        if outcome < odds.payment_failure:
            reason = self.rng.choice(FAILURE_REASONS)
            self.emit("PAYMENT_FAILED", paymentId=payment_id, reason=reason)
            self.notify("payment_update")
            self.emit("ORDER_CANCELLED", reason="payment_failed")
        elif outcome < odds.payment_failure + odds.cancel_before_capture:
            self.emit("ORDER_CANCELLED", reason=self.rng.choice(CANCEL_REASONS))
            self.notify("order_cancellation")
        else:
            self.capture_and_ship(total, currency, payment_id)
            if self.rng.random() < odds.refund:
                self.emit("PAYMENT_REFUNDED", **money)
                self.notify("payment_update")
        return self.events


def generate_stream(
    orders: int,
    seed: int,
    *,
    start: datetime = DEFAULT_START,
    first_order_number: int = 100_000,
    odds: LifecycleOdds | None = None,
) -> list[dict[str, Any]]:
    """Generate the interleaved events of `orders` orders as JSON-ready dicts.

    Order ids are `ORD-<first_order_number + i>`. Start times are spread uniformly over
    max(1 hour, orders * 10 s) after `start`. The result is sorted by timestamp, ties in
    order creation order. The same arguments give the same list.
    """
    if orders < 0:
        raise ValueError(f"orders must be >= 0, got {orders}")
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware, e.g. datetime(..., tzinfo=UTC)")
    odds = odds or LifecycleOdds()
    rng = random.Random(seed)
    window_s = max(3600.0, orders * 10.0)

    events: list[dict[str, Any]] = []
    for index in range(orders):
        started_at = start + timedelta(seconds=rng.uniform(0, window_s))
        order_id = f"ORD-{first_order_number + index}"
        events.extend(_OrderBuilder(rng, order_id, started_at).build(odds))

    # sorted() is stable and each order's timestamps strictly increase, so every
    # order keeps its lifecycle order.
    return sorted(events, key=lambda event: event["timestamp"])


def write_jsonl(events: Iterable[dict[str, Any]], path: Path | str) -> int:
    """Write one compact JSON object per line to `path`; return the number of lines."""
    count = 0
    with Path(path).open("w", encoding="utf-8") as output:
        for event in events:
            output.write(json.dumps(event, separators=(",", ":")) + "\n")
            count += 1
    return count


def read_jsonl(
    path: Path | str, *, max_depth: int = DEFAULT_MAX_DEPTH
) -> list[dict[str, Any]]:
    """Read a JSON lines file of events like `read_numbered_jsonl`, without numbers."""
    return [event for _, event in read_numbered_jsonl(path, max_depth=max_depth)]


def read_numbered_jsonl(
    path: Path | str, *, max_depth: int = DEFAULT_MAX_DEPTH
) -> list[tuple[int, dict[str, Any]]]:
    """Read a JSON lines file of events as (line number, event), skipping blanks.

    Each line is parsed as the consumer parses a message body, so a line that it
    would dead-letter as malformed is rejected here: invalid UTF-8, nesting deeper
    than `max_depth`, NaN, Infinity, numbers outside the double range and duplicate
    keys. Raises `ValueError` naming the line number of the first such line and of a
    line that is not a JSON object.
    """
    events: list[tuple[int, dict[str, Any]]] = []
    with Path(path).open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: invalid UTF-8: {error.reason} at byte "
                    f"{error.start} of the line"
                ) from None
            if not line.strip():
                continue
            depth = json_depth(line)
            if depth > max_depth:
                raise ValueError(
                    f"{path}:{number}: JSON nesting depth {depth} exceeds the limit "
                    f"of {max_depth}"
                )
            try:
                value = loads_strict(line)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: invalid JSON: {error}") from None
            if not isinstance(value, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object per line")
            events.append((number, value))
    return events
