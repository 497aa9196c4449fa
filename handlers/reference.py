"""Reference projection of a whole stream, computed in memory without the store.

Integration tests publish a stream, consume it with the bundled handlers and compare
the store with `project_stream` of the same stream. Both use the rules of
`handlers.projection`, so the comparison checks delivery (each event applied once, in
order per order) and persistence rather than the rules themselves, which
`tests/test_handlers.py` checks case by case.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from consumer.events import Event, validate_event
from consumer.publish import message_id_for
from handlers.projection import InvalidTransition, Projection, apply_event


def project_stream(
    events: Iterable[Mapping[str, Any] | Event[Any]],
    *,
    message_id: Callable[[Mapping[str, Any] | Event[Any]], str] = message_id_for,
) -> dict[str, Projection]:
    """Return the projection of every order after applying `events` in order.

    Dicts are validated like message bodies. An event that the rules reject is skipped,
    as the consumer dead-letters it, and a repeated message id is applied once.
    `message_id` gives each event's id; the default matches `consumer.publish`.
    """
    projections: dict[str, Projection] = {}
    seen: set[tuple[str, str]] = set()
    for item in events:
        event = item if isinstance(item, Event) else validate_event(dict(item))
        key = (event.order_id, message_id(item))
        if key in seen:
            continue
        try:
            projections[event.order_id] = apply_event(
                projections.get(event.order_id), event, key[1]
            )
        except InvalidTransition:
            continue
        seen.add(key)
    return projections
