"""Protocol helpers of the proton edge: error conditions, filters, outcomes, timers."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable
from typing import Any

from proton import (
    Condition,
    Delivery,
    Disposition,
    Endpoint,
    Event,
    Handler,
    Sender,
    symbol,
)

from localbus.errors import INTERNAL_ERROR, BrokerError
from localbus.records import Outcome

log = logging.getLogger("localbus")

DEAD_LETTER_REASON = "DeadLetterReason"
# The address of the broker's admin node (see `localbus.admin`).
ADMIN_ADDRESS = "$localbus-admin"
DEAD_LETTER_DESCRIPTION = "DeadLetterErrorDescription"
# .NET ticks (100 ns since 0001-01-01) at the Unix epoch.
DOTNET_EPOCH_TICKS = 621_355_968_000_000_000


def dotnet_ticks(epoch_ms: int) -> int:
    """Convert epoch milliseconds to .NET ticks, as `locked-until-utc` expects."""
    return epoch_ms * 10_000 + DOTNET_EPOCH_TICKS


class Timer(Handler):
    def __init__(self, callback: Callable[[], None]) -> None:
        super().__init__()
        self._callback = callback

    def on_timer_task(self, event: Event) -> None:
        self._callback()


def _guarded(method: Callable[[Any, Event], None]) -> Callable[[Any, Event], None]:
    """Contain a failure to the connection whose event raised it.

    An exception that escapes a handler ends the container loop and so the broker.
    The wrapper logs it and closes only the event's connection.
    """

    @functools.wraps(method)
    def run(self: Any, event: Event) -> None:
        try:
            method(self, event)
        except Exception:
            log.exception("event_failed event=%s", event.type)
            connection = getattr(event, "connection", None)
            if connection is not None and connection.state & Endpoint.LOCAL_ACTIVE:
                # pyamqp 7.15 expects the info field of a close error to be present.
                connection.condition = Condition(
                    INTERNAL_ERROR,
                    "the broker failed to process a frame",
                    {symbol("event"): str(event.type)},
                )
                connection.close()

    return run


def guard_handlers(cls: type[Handler]) -> type[Handler]:
    for name, value in list(vars(cls).items()):
        if name.startswith("on_") and callable(value):
            setattr(cls, name, _guarded(value))
    return cls


def condition_of(error: BrokerError) -> Condition:
    # pyamqp 7.15 indexes the info field of an error without checking that it is
    # present, and proton leaves an empty info out, so always send one entry.
    return Condition(
        error.condition,
        error.description,
        {symbol("com.microsoft:tracking-id"): str(uuid.uuid4())},
    )


def link_kind(path: str) -> str:
    lowered = path.lower()
    if lowered == "$cbs":
        return "cbs"
    if lowered == ADMIN_ADDRESS:
        return "admin"
    if lowered.endswith("$management"):
        return "management"
    return "entity"


def read_filters(link: Sender) -> dict[Any, Any]:
    data = link.remote_source.filter
    data.rewind()
    if not data.next():
        return {}
    value = data.get_object()
    return dict(value) if isinstance(value, dict) else {}


def outcome_of(delivery: Delivery) -> tuple[Outcome, str | None, str | None]:
    state = delivery.remote_state
    if state == Disposition.ACCEPTED:
        return Outcome.COMPLETE, None, None
    if state == Disposition.REJECTED:
        condition = delivery.remote.condition
        info = dict(condition.info or {}) if condition is not None else {}
        reason = info.get(DEAD_LETTER_REASON)
        description = info.get(DEAD_LETTER_DESCRIPTION)
        if description is None and condition is not None:
            description = condition.description
        return Outcome.DEAD_LETTER, reason, description
    if state == Disposition.MODIFIED and delivery.remote.undeliverable:
        return Outcome.DEFER, None, None
    return Outcome.ABANDON, None, None
