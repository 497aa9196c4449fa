"""The one decision table: what happens to a message after the framework looked at it.

Every path through the processor ends in exactly one of these outcomes:

| situation                                   | action      | reason               |
|---------------------------------------------|-------------|----------------------|
| every handler returned                      | complete    |                      |
| already handled (checkpoint, duplicate id)  | complete    |                      |
| no handler and unknown types are ignored    | complete    |                      |
| body not UTF-8 or not JSON                  | dead-letter | MalformedBody        |
| body fails the schema of its event type     | dead-letter | SchemaValidationFailed |
| no handler for the event type               | dead-letter | UnknownEventType     |
| payload.orderId differs from the session id | dead-letter | SessionMismatch      |
| handler raised `DeadLetter(reason, ...)`    | dead-letter | that reason          |
| handler raised a `PermanentError` subclass  | dead-letter | the class name       |
| retries exhausted, next abandon would reach |             |                      |
| the entity's max delivery count             | dead-letter | MaxRetriesExceeded   |
| retries exhausted otherwise                 | abandon     |                      |
| the order's session is parked               | defer       |                      |
| a resubmitted copy of a message older than  |             |                      |
| the checkpoint, sent outside an unpark      | dead-letter | OutOfOrder           |

A lost session lock is not in the table: the worker settles nothing and stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import structlog

from consumer.errors import DeadLetter, PermanentError
from consumer.metrics import ConsumerMetrics
from consumer.transport import InboundMessage, SessionReceiver

log = structlog.get_logger("orders_consumer.settlement")

# Service Bus stores the reason and description as application properties; the limit
# below keeps them readable in tools and well under the message size limits.
MAX_DESCRIPTION_CHARS = 1024

MALFORMED_BODY = "MalformedBody"
SCHEMA_VALIDATION_FAILED = "SchemaValidationFailed"
UNKNOWN_EVENT_TYPE = "UnknownEventType"
SESSION_MISMATCH = "SessionMismatch"
MAX_RETRIES_EXCEEDED = "MaxRetriesExceeded"
# The reason Service Bus gives a message it dead-letters by itself after its last
# allowed delivery failed.
MAX_DELIVERY_COUNT_EXCEEDED = "MaxDeliveryCountExceeded"
OUT_OF_ORDER = "OutOfOrder"


class Action(StrEnum):
    """The broker operation that settles a message."""

    COMPLETE = "complete"
    ABANDON = "abandon"
    DEFER = "defer"
    DEAD_LETTER = "dead_letter"


class Outcome(StrEnum):
    """Result of handling a message, as logged and used for metric labels."""

    COMPLETED = "completed"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"
    ABANDONED = "abandoned"
    DEFERRED = "deferred"
    DEAD_LETTERED = "dead_lettered"


@dataclass(frozen=True)
class Settlement:
    """One decided settlement: the action, the outcome and, for dead-letters, why."""

    action: Action
    outcome: Outcome
    reason: str = ""
    description: str = ""

    @property
    def releases_session(self) -> bool:
        """Whether the worker must release the session after applying it.

        After an abandon, the receiver may already hold later messages of the same
        session (prefetch). Closing the receiver returns them to the broker so they
        cannot run before the abandoned message comes back.
        """
        return self.action is Action.ABANDON


def bounded(text: str, limit: int = MAX_DESCRIPTION_CHARS) -> str:
    """Return `text` cut to `limit` characters, marking the cut with an ellipsis."""
    if len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


def completed() -> Settlement:
    """Settle a message whose handlers all returned."""
    return Settlement(Action.COMPLETE, Outcome.COMPLETED)


def duplicate() -> Settlement:
    """Settle a message that was already handled, without running handlers again."""
    return Settlement(Action.COMPLETE, Outcome.DUPLICATE)


def deferred() -> Settlement:
    """Set aside a message of a parked order until the order is resumed."""
    return Settlement(Action.DEFER, Outcome.DEFERRED)


def dead_lettered(reason: str, description: str) -> Settlement:
    """Send a message to the dead-letter queue with `reason` and `description`."""
    return Settlement(
        Action.DEAD_LETTER, Outcome.DEAD_LETTERED, reason, bounded(description)
    )


def rejected(reason: str, description: str, unknown_event_policy: str) -> Settlement:
    """Settle a message whose body the parser rejected with `reason`.

    An unknown event type is completed and counted as ignored when the policy is
    `ignore`. Every other rejection is dead-lettered at the first delivery, because no
    retry can change the body.
    """
    if reason == UNKNOWN_EVENT_TYPE and unknown_event_policy == "ignore":
        return Settlement(
            Action.COMPLETE, Outcome.IGNORED, reason, bounded(description)
        )
    return dead_lettered(reason, description)


def session_mismatch(order_id: str, session_id: str) -> Settlement:
    """Dead-letter a message whose payload.orderId is not its session id."""
    return dead_lettered(
        SESSION_MISMATCH,
        f"payload.orderId {order_id!r} differs from the session id {session_id!r}",
    )


def out_of_order(
    original_sequence_number: int, last_sequence_number: int
) -> Settlement:
    """Dead-letter a resubmitted copy that would run after later messages of its order.

    Running it would apply an old event on top of newer ones, so an operator must
    decide what to do with it.
    """
    return dead_lettered(
        OUT_OF_ORDER,
        f"resubmitted copy of sequence number {original_sequence_number} arrived "
        f"after the order's checkpoint at sequence number {last_sequence_number}; "
        "resubmit it with `orders-consumer sessions unpark` while the order is "
        "parked, or handle it by hand",
    )


def describe_error(error: BaseException) -> str:
    """Return `Type: message` of `error`, bounded for a dead-letter description."""
    text = str(error)
    name = type(error).__name__
    return bounded(f"{name}: {text}" if text else name)


def is_last_delivery(delivery_count: int, max_delivery_count: int) -> bool:
    """Return whether the broker dead-letters the message if this delivery fails.

    `delivery_count` is 0 on the first delivery, so this delivery is number
    `delivery_count + 1`.
    """
    return delivery_count + 1 >= max_delivery_count


def after_failure(
    error: BaseException, delivery_count: int, max_delivery_count: int
) -> Settlement:
    """Settle a message whose handlers failed with `error` after in-process retries.

    `delivery_count` is 0 on the first delivery, so this delivery is number
    `delivery_count + 1`. The broker dead-letters a message by itself once an abandon
    makes it reach `max_delivery_count` deliveries, without saying why. The framework
    dead-letters first, with the exception as description.
    """
    if isinstance(error, DeadLetter):
        return dead_lettered(error.reason, error.description)
    if isinstance(error, PermanentError):
        return dead_lettered(type(error).__name__, str(error))
    if is_last_delivery(delivery_count, max_delivery_count):
        return dead_lettered(MAX_RETRIES_EXCEEDED, describe_error(error))
    return Settlement(Action.ABANDON, Outcome.ABANDONED, "", describe_error(error))


async def apply(
    receiver: SessionReceiver, message: InboundMessage, settlement: Settlement
) -> None:
    """Perform the broker operation of `settlement` on `message`.

    Raises `SessionLockLost` or `TransportError` from the transport unchanged.
    """
    if settlement.action is Action.COMPLETE:
        await receiver.complete(message)
    elif settlement.action is Action.ABANDON:
        await receiver.abandon(message)
    elif settlement.action is Action.DEFER:
        await receiver.defer(message)
    else:
        await receiver.dead_letter(message, settlement.reason, settlement.description)


def record(
    metrics: ConsumerMetrics,
    entity: str,
    event_type: str,
    message: InboundMessage,
    settlement: Settlement,
) -> None:
    """Count and log an applied settlement; `event_type` is a bounded label value."""
    labels = (entity, event_type)
    outcome = settlement.outcome
    if outcome is Outcome.COMPLETED:
        metrics.child(metrics.messages_completed, *labels).inc()
        log.debug("message_completed")
    elif outcome is Outcome.DUPLICATE:
        metrics.child(metrics.messages_duplicate, *labels).inc()
        log.info("message_skipped", reason="already handled")
    elif outcome is Outcome.IGNORED:
        metrics.child(metrics.messages_ignored, *labels).inc()
        log.info("message_ignored", reason=settlement.reason)
    elif outcome is Outcome.DEFERRED:
        metrics.child(metrics.messages_deferred, *labels).inc()
        log.info("message_deferred")
    elif outcome is Outcome.ABANDONED:
        metrics.child(metrics.messages_abandoned, *labels).inc()
        log.warning("message_abandoned", error=settlement.description)
    else:
        reason = metrics.reason_label(settlement.reason)
        metrics.child(metrics.messages_dead_lettered, *labels, reason).inc()
        log.error(
            "message_dead_lettered",
            reason=settlement.reason,
            description=settlement.description,
        )
    if message.enqueued_at is not None:
        lag_s = (datetime.now(UTC) - message.enqueued_at).total_seconds()
        metrics.child(metrics.end_to_end_lag, *labels).observe(max(lag_s, 0.0))
