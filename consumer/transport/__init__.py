"""The seam between the session processor and a message broker.

The processor needs only what `Transport` and `SessionReceiver` declare: accept the next
available session, receive one message at a time, settle it, read and write the session
state, renew the session lock and close. `consumer.transport.azure` implements them on
`azure.servicebus.aio`. Keep the seam this narrow so an in-memory implementation fits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True)
class InboundMessage:
    """One received message, with the broker fields the framework reads.

    `delivery_count` follows the Python SDK and the AMQP header: 0 on the first
    delivery, one more after each abandon or lock expiry. `body` is None when the
    message has no binary data sections (an AMQP value or sequence body), which the
    framework rejects.
    """

    body: bytes | None
    message_id: str
    session_id: str
    sequence_number: int
    delivery_count: int
    enqueued_at: datetime | None
    correlation_id: str | None
    subject: str | None
    handle: Any  # the transport's own message object, passed back to settle it
    # Set on copies that `orders-consumer dlq resubmit` or `sessions unpark` sent:
    # the sequence number of the message first published, which fixes its place.
    original_sequence_number: int | None = None
    # Application properties, read for W3C trace context (traceparent, Diagnostic-Id).
    application_properties: Mapping[Any, Any] | None = None


class SessionReceiver(Protocol):
    """A held session: messages come one at a time and are settled through it."""

    @property
    def session_id(self) -> str:
        """Id of the held session (the order id)."""
        ...

    @property
    def locked_until(self) -> datetime | None:
        """Expiry of the session lock in UTC, if the broker reported one."""
        ...

    async def receive(self, max_wait_s: float) -> InboundMessage | None:
        """Return the next message of the session, or None after `max_wait_s` idle."""
        ...

    async def peek_sequence_numbers(
        self, from_sequence_number: int, max_count: int
    ) -> list[int]:
        """Return the sequence numbers of up to `max_count` active or deferred
        messages from `from_sequence_number` on, without locking them."""
        ...

    async def receive_deferred(
        self, sequence_numbers: list[int]
    ) -> list[InboundMessage]:
        """Return deferred messages of this session by sequence number."""
        ...

    async def complete(self, message: InboundMessage) -> None:
        """Remove the message from the entity."""
        ...

    async def abandon(self, message: InboundMessage) -> None:
        """Release the lock so the message returns at the head of its session."""
        ...

    async def defer(self, message: InboundMessage) -> None:
        """Set the message aside; only `receive_deferred` can fetch it again."""
        ...

    async def dead_letter(
        self, message: InboundMessage, reason: str, description: str
    ) -> None:
        """Move the message to the dead-letter queue with `reason` and `description`."""
        ...

    async def get_state(self) -> bytes | None:
        """Return the session state, or None when none was set."""
        ...

    async def set_state(self, state: bytes | None) -> None:
        """Replace the session state."""
        ...

    async def renew_lock(self) -> datetime:
        """Extend the session lock and return its new expiry."""
        ...

    async def close(self) -> None:
        """Release the session; unsettled messages return to the broker in order."""
        ...


class Transport(Protocol):
    """A connection to one entity (queue or topic subscription) with sessions."""

    @property
    def entity(self) -> str:
        """Queue name, or `topic/subscriptions/name`, for logs and metric labels."""
        ...

    async def accept_session(self, max_wait_s: float) -> SessionReceiver | None:
        """Lock the next available session, or return None after `max_wait_s`.

        When cancelled, release any session the accept locked, so that stopping the
        consumer can cancel accepts in flight.
        """
        ...

    async def close(self) -> None:
        """Close every receiver and the connection."""
        ...
