"""The per-order projection and the pure rules that move it from one event to the next.

`apply_event` is the only place that decides whether an event is possible for an order
in its current state. The SQLite store and the reference computation both call it, so
they cannot disagree on the rules. Amounts are `Decimal` built from the JSON number's
shortest text form, so `0.1 + 0.2` is exactly `0.3` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from enum import StrEnum
from typing import Any

from consumer.errors import PermanentError
from consumer.events import Event


class OrderStatus(StrEnum):
    """Lifecycle state of an order in the projection."""

    CREATED = "created"
    AUTHORIZED = "authorized"
    PAYMENT_FAILED = "payment_failed"
    PAID = "paid"
    FULFILLING = "fulfilling"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"
    REFUNDED = "refunded"


class InvalidTransition(PermanentError):
    """Event impossible in the order's current state, so it is dead-lettered."""


ZERO = Decimal(0)


@dataclass(frozen=True)
class Projection:
    """State of one order after the events applied so far."""

    order_id: str
    status: OrderStatus
    customer_id: str
    total_amount: Decimal
    currency: str | None = None
    amount_authorized: Decimal = ZERO
    amount_captured: Decimal = ZERO
    amount_refunded: Decimal = ZERO
    warehouse_id: str | None = None
    carrier: str | None = None
    tracking_number: str | None = None
    delivered_at: str | None = None
    notifications_sent: int = 0
    cancel_reason: str | None = None
    payment_failure_reason: str | None = None
    events_applied: int = 0
    last_message_id: str | None = None


def money(value: float) -> Decimal:
    """Return a JSON number as an exact `Decimal` (`100.68` stays `100.68`)."""
    return Decimal(str(value))


Rule = Callable[[Projection, Any], dict[str, Any]]

# Statuses in which each event type is possible. CUSTOMER_NOTIFIED is possible in every
# status, and PAYMENT_REFUNDED in every status once money was captured.
ALLOWED_FROM: dict[str, frozenset[OrderStatus]] = {
    "ORDER_UPDATED": frozenset(
        {OrderStatus.CREATED, OrderStatus.AUTHORIZED, OrderStatus.PAYMENT_FAILED}
    ),
    "ORDER_CANCELLED": frozenset(
        {
            OrderStatus.CREATED,
            OrderStatus.AUTHORIZED,
            OrderStatus.PAYMENT_FAILED,
            OrderStatus.PAID,
        }
    ),
    "PAYMENT_AUTHORIZED": frozenset(
        {OrderStatus.CREATED, OrderStatus.AUTHORIZED, OrderStatus.PAYMENT_FAILED}
    ),
    "PAYMENT_FAILED": frozenset({OrderStatus.CREATED, OrderStatus.AUTHORIZED}),
    "PAYMENT_CAPTURED": frozenset({OrderStatus.AUTHORIZED, OrderStatus.PAID}),
    "FULFILLMENT_STARTED": frozenset({OrderStatus.PAID}),
    "ORDER_SHIPPED": frozenset({OrderStatus.PAID, OrderStatus.FULFILLING}),
    "ORDER_DELIVERED": frozenset({OrderStatus.SHIPPED}),
    "PAYMENT_REFUNDED": frozenset(OrderStatus) - {OrderStatus.REFUNDED},
    "CUSTOMER_NOTIFIED": frozenset(OrderStatus),
}


def _reject(order: Projection, event_type: str, reason: str) -> InvalidTransition:
    return InvalidTransition(
        f"{event_type} is impossible for order {order.order_id} "
        f"(status {order.status.value}): {reason}"
    )


def _check_allowed(order: Projection, event_type: str) -> None:
    if order.status in ALLOWED_FROM[event_type]:
        return
    if order.status is OrderStatus.CANCELLED:
        reason = "the order was cancelled"
    elif order.status in (OrderStatus.DELIVERED, OrderStatus.REFUNDED):
        reason = f"the order is already {order.status.value}"
    elif event_type in ("ORDER_SHIPPED", "FULFILLMENT_STARTED") and not (
        order.amount_captured
    ):
        reason = "the payment has not been captured yet"
    else:
        allowed = sorted(status.value for status in ALLOWED_FROM[event_type])
        reason = f"it is only possible in status {', '.join(allowed)}"
    raise _reject(order, event_type, reason)


def _check_currency(order: Projection, event_type: str, currency: str) -> None:
    if order.currency is not None and currency != order.currency:
        raise _reject(
            order,
            event_type,
            f"currency {currency} differs from the order's currency {order.currency}",
        )


def _updated(order: Projection, payload: Any) -> dict[str, Any]:
    if payload.total_amount is None:
        return {}
    return {"total_amount": money(payload.total_amount)}


def _cancelled(order: Projection, payload: Any) -> dict[str, Any]:
    return {"status": OrderStatus.CANCELLED, "cancel_reason": payload.reason}


def _authorized(order: Projection, payload: Any) -> dict[str, Any]:
    _check_currency(order, "PAYMENT_AUTHORIZED", payload.currency)
    return {
        "status": OrderStatus.AUTHORIZED,
        "currency": payload.currency,
        "amount_authorized": order.amount_authorized + money(payload.amount),
    }


def _failed(order: Projection, payload: Any) -> dict[str, Any]:
    return {
        "status": OrderStatus.PAYMENT_FAILED,
        "payment_failure_reason": payload.reason,
    }


def _captured(order: Projection, payload: Any) -> dict[str, Any]:
    _check_currency(order, "PAYMENT_CAPTURED", payload.currency)
    captured = order.amount_captured + money(payload.amount)
    if captured > order.amount_authorized:
        raise _reject(
            order,
            "PAYMENT_CAPTURED",
            f"capturing {payload.amount} would bring the captured amount to "
            f"{captured}, above the authorized {order.amount_authorized}",
        )
    return {"status": OrderStatus.PAID, "amount_captured": captured}


def _refunded(order: Projection, payload: Any) -> dict[str, Any]:
    _check_currency(order, "PAYMENT_REFUNDED", payload.currency)
    refunded = order.amount_refunded + money(payload.amount)
    if refunded > order.amount_captured:
        raise _reject(
            order,
            "PAYMENT_REFUNDED",
            f"refunding {payload.amount} would bring the refunded amount to "
            f"{refunded}, above the captured {order.amount_captured}",
        )
    changes: dict[str, Any] = {"amount_refunded": refunded}
    if refunded == order.amount_captured:
        changes["status"] = OrderStatus.REFUNDED
    return changes


def _fulfilling(order: Projection, payload: Any) -> dict[str, Any]:
    return {"status": OrderStatus.FULFILLING, "warehouse_id": payload.warehouse_id}


def _shipped(order: Projection, payload: Any) -> dict[str, Any]:
    return {
        "status": OrderStatus.SHIPPED,
        "carrier": payload.carrier,
        "tracking_number": payload.tracking_number,
    }


def _delivered(order: Projection, payload: Any) -> dict[str, Any]:
    return {
        "status": OrderStatus.DELIVERED,
        "delivered_at": payload.delivered_at.isoformat(),
    }


def _notified(order: Projection, payload: Any) -> dict[str, Any]:
    return {"notifications_sent": order.notifications_sent + 1}


RULES: dict[str, Rule] = {
    "ORDER_UPDATED": _updated,
    "ORDER_CANCELLED": _cancelled,
    "PAYMENT_AUTHORIZED": _authorized,
    "PAYMENT_FAILED": _failed,
    "PAYMENT_CAPTURED": _captured,
    "PAYMENT_REFUNDED": _refunded,
    "FULFILLMENT_STARTED": _fulfilling,
    "ORDER_SHIPPED": _shipped,
    "ORDER_DELIVERED": _delivered,
    "CUSTOMER_NOTIFIED": _notified,
}


def _create(event: Event[Any]) -> Projection:
    payload = event.payload
    return Projection(
        order_id=payload.order_id,
        status=OrderStatus.CREATED,
        customer_id=payload.customer_id,
        total_amount=money(payload.total_amount),
    )


def apply_event(
    order: Projection | None, event: Event[Any], message_id: str
) -> Projection:
    """Return the projection after `event`, or raise `InvalidTransition`.

    `order` is None when the order has no projection yet, which only ORDER_CREATED
    accepts. The caller handles redelivery: this function applies whatever it gets.
    """
    event_type = event.event_type
    if event_type == "ORDER_CREATED":
        if order is not None:
            raise _reject(order, event_type, "the order already exists")
        updated = _create(event)
    elif order is None:
        raise InvalidTransition(
            f"{event_type} for order {event.order_id}, which does not exist: "
            "ORDER_CREATED must be handled first"
        )
    else:
        _check_allowed(order, event_type)
        updated = replace(order, **RULES[event_type](order, event.payload))
    return replace(
        updated,
        events_applied=updated.events_applied + 1,
        last_message_id=message_id,
    )
