"""The step every bundled handler shares: apply the event to the store and log it."""

from __future__ import annotations

from typing import Any

from consumer.events import Event
from consumer.routing import EventContext
from handlers.store import ProjectionStore


def record_event(store: ProjectionStore, event: Event[Any], ctx: EventContext) -> None:
    """Apply `event` to its order's projection, once per message id.

    Raises `InvalidTransition` (a `PermanentError`) when the event is impossible for
    the order, so the framework dead-letters the message without retries.
    """
    # A message without an id is recognized by its sequence number instead, which the
    # broker assigns once per message and keeps across redeliveries.
    message_id = ctx.message_id or f"sequence-number:{ctx.sequence_number}"
    projection = store.apply(event, message_id)
    if projection is None:
        ctx.log.info("projection_update_skipped", reason="message already applied")
        return
    ctx.log.debug(
        "projection_updated",
        status=projection.status.value,
        events_applied=projection.events_applied,
    )
