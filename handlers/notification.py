"""Notification handler: counts the messages sent to each order's customer."""

from __future__ import annotations

from consumer.events import CustomerNotified
from consumer.routing import EventContext, Router
from handlers.common import record_event
from handlers.store import ProjectionStore


def build_router(store: ProjectionStore) -> Router:
    """Return a router whose notification handler updates `store`."""
    router = Router()

    @router.handler("CUSTOMER_NOTIFIED")
    def count_notification(event: CustomerNotified, ctx: EventContext) -> None:
        record_event(store, event, ctx)

    return router
