"""Order and fulfillment handlers: creation, changes, cancellation, shipment."""

from __future__ import annotations

from consumer.events import (
    FulfillmentStarted,
    OrderCancelled,
    OrderCreated,
    OrderDelivered,
    OrderShipped,
    OrderUpdated,
)
from consumer.routing import EventContext, Router
from handlers.common import record_event
from handlers.store import ProjectionStore


def build_router(store: ProjectionStore) -> Router:
    """Return a router whose order and fulfillment handlers update `store`."""
    router = Router()

    @router.handler("ORDER_CREATED")
    def open_order(event: OrderCreated, ctx: EventContext) -> None:
        record_event(store, event, ctx)

    @router.handler("ORDER_UPDATED")
    def update_order(event: OrderUpdated, ctx: EventContext) -> None:
        record_event(store, event, ctx)

    @router.handler("ORDER_CANCELLED")
    def cancel_order(event: OrderCancelled, ctx: EventContext) -> None:
        record_event(store, event, ctx)

    @router.handler("FULFILLMENT_STARTED")
    def start_fulfillment(event: FulfillmentStarted, ctx: EventContext) -> None:
        record_event(store, event, ctx)

    @router.handler("ORDER_SHIPPED")
    def record_shipment(event: OrderShipped, ctx: EventContext) -> None:
        record_event(store, event, ctx)

    @router.handler("ORDER_DELIVERED")
    def record_delivery(event: OrderDelivered, ctx: EventContext) -> None:
        record_event(store, event, ctx)

    return router
