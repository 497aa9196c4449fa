"""Payment handlers: authorization, capture, failure and refund amounts."""

from __future__ import annotations

from consumer.events import (
    PaymentAuthorized,
    PaymentCaptured,
    PaymentFailed,
    PaymentRefunded,
)
from consumer.routing import EventContext, Router
from handlers.common import record_event
from handlers.store import ProjectionStore


def build_router(store: ProjectionStore) -> Router:
    """Return a router whose payment handlers update `store`.

    A capture above the authorized amount, a refund above the captured amount and a
    currency different from the order's raise `InvalidTransition`.
    """
    router = Router()

    @router.handler("PAYMENT_AUTHORIZED")
    def record_authorization(event: PaymentAuthorized, ctx: EventContext) -> None:
        record_event(store, event, ctx)

    @router.handler("PAYMENT_CAPTURED")
    def record_capture(event: PaymentCaptured, ctx: EventContext) -> None:
        record_event(store, event, ctx)

    @router.handler("PAYMENT_FAILED")
    def record_failure(event: PaymentFailed, ctx: EventContext) -> None:
        record_event(store, event, ctx)

    @router.handler("PAYMENT_REFUNDED")
    def record_refund(event: PaymentRefunded, ctx: EventContext) -> None:
        record_event(store, event, ctx)

    return router
