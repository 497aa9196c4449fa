"""An in-process transport for handler tests: sessions, locks and settlement in memory.

It follows the Service Bus rules the processor relies on. A session has one receiver
at a time and delivers its messages in sequence-number order. An abandoned message
returns to the head of its session with a higher delivery count. Deferred messages are
fetched only by sequence number, and dead-lettered ones keep reason and description.
Session locks never expire here, so tests of lock loss belong with the local broker.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from consumer.errors import TransportError
from consumer.transport import InboundMessage


@dataclass
class StoredMessage:
    """A message as the memory broker keeps it."""

    body: bytes
    session_id: str
    message_id: str
    subject: str | None
    correlation_id: str | None
    sequence_number: int
    enqueued_at: datetime
    delivery_count: int = 0
    deferred: bool = False
    dead_letter_reason: str | None = None
    dead_letter_description: str | None = None
    application_properties: dict[str, Any] | None = None


@dataclass
class MemorySession:
    """The messages and state of one session."""

    pending: list[StoredMessage] = field(default_factory=list)
    deferred: dict[int, StoredMessage] = field(default_factory=dict)
    state: bytes | None = None
    locked: bool = False


class MemoryBroker:
    """Sessions of one entity, shared by the transports created from it."""

    def __init__(self, entity: str = "orders.memory.events") -> None:
        self.entity = entity
        self.sessions: dict[str, MemorySession] = defaultdict(MemorySession)
        self.dead_letters: list[StoredMessage] = []
        self.completed: list[StoredMessage] = []
        self._sequence = itertools.count(1)
        self._changed = asyncio.Condition()

    async def send(
        self,
        body: bytes,
        *,
        session_id: str,
        message_id: str,
        subject: str | None = None,
        correlation_id: str | None = None,
        application_properties: dict[str, Any] | None = None,
    ) -> int:
        """Append a message to `session_id` and return its sequence number."""
        number = next(self._sequence)
        message = StoredMessage(
            body,
            session_id,
            message_id,
            subject,
            correlation_id,
            number,
            datetime.now(UTC),
            application_properties=application_properties,
        )
        self.sessions[session_id].pending.append(message)
        async with self._changed:
            self._changed.notify_all()
        return number

    def _next_free_session(self) -> str | None:
        for session_id, session in self.sessions.items():
            if not session.locked and session.pending:
                return session_id
        return None

    async def _wait_for(self, predicate: Any, max_wait_s: float) -> Any:
        # The wait runs in the caller's task. Under asyncio.wait_for the condition
        # re-acquired its lock in a separate task, and a cancel that arrived while
        # wait_for was timing out could leave the lock locked with no task to
        # release it, which hung every later accept and close.
        found = predicate()
        if found:
            return found
        async with self._changed:
            try:
                async with asyncio.timeout(max_wait_s):
                    return await self._changed.wait_for(predicate)
            except TimeoutError:
                return None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


class MemorySessionReceiver:
    """A `SessionReceiver` on one locked session of a `MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, session_id: str) -> None:
        self._broker = broker
        self._session_id = session_id
        self._session = broker.sessions[session_id]
        self._in_flight: dict[int, StoredMessage] = {}
        self._closed = False

    @property
    def session_id(self) -> str:
        """Id of the held session."""
        return self._session_id

    @property
    def locked_until(self) -> datetime | None:
        """Always None: memory session locks do not expire."""
        return None

    def _inbound(self, message: StoredMessage) -> InboundMessage:
        self._in_flight[message.sequence_number] = message
        return InboundMessage(
            body=message.body,
            message_id=message.message_id,
            session_id=message.session_id,
            sequence_number=message.sequence_number,
            delivery_count=message.delivery_count,
            enqueued_at=message.enqueued_at,
            correlation_id=message.correlation_id,
            subject=message.subject,
            handle=message.sequence_number,
            application_properties=message.application_properties,
        )

    def _take(self, message: InboundMessage) -> StoredMessage:
        if self._closed:
            raise TransportError(f"receiver of session {self._session_id} is closed")
        stored = self._in_flight.pop(message.handle, None)
        if stored is None:
            raise TransportError(f"message {message.message_id} is not locked here")
        return stored

    async def receive(self, max_wait_s: float) -> InboundMessage | None:
        """Return the head of the session, or None after `max_wait_s` idle."""
        session = self._session
        found = await self._broker._wait_for(lambda: bool(session.pending), max_wait_s)
        if not found:
            return None
        return self._inbound(session.pending.pop(0))

    async def peek_sequence_numbers(
        self, from_sequence_number: int, max_count: int
    ) -> list[int]:
        """Return the sequence numbers of up to `max_count` pending or deferred
        messages from `from_sequence_number` on."""
        session = self._session
        numbers = [m.sequence_number for m in session.pending]
        numbers.extend(session.deferred)
        later = sorted(n for n in numbers if n >= from_sequence_number)
        return later[:max_count]

    async def receive_deferred(
        self, sequence_numbers: list[int]
    ) -> list[InboundMessage]:
        """Return the deferred messages with these sequence numbers, in that order."""
        found = []
        for number in sequence_numbers:
            stored = self._session.deferred.pop(number, None)
            if stored is not None:
                found.append(self._inbound(stored))
        return found

    async def complete(self, message: InboundMessage) -> None:
        """Remove the message."""
        self._broker.completed.append(self._take(message))

    async def abandon(self, message: InboundMessage) -> None:
        """Put the message back at the head of its session."""
        stored = self._take(message)
        stored.delivery_count += 1
        if stored.deferred:
            self._session.deferred[stored.sequence_number] = stored
        else:
            self._session.pending.insert(0, stored)
        await self._broker._notify()

    async def defer(self, message: InboundMessage) -> None:
        """Keep the message aside for `receive_deferred`."""
        stored = self._take(message)
        stored.deferred = True
        self._session.deferred[stored.sequence_number] = stored

    async def dead_letter(
        self, message: InboundMessage, reason: str, description: str
    ) -> None:
        """Move the message to the dead-letter list."""
        stored = self._take(message)
        stored.dead_letter_reason = reason
        stored.dead_letter_description = description
        self._broker.dead_letters.append(stored)

    async def get_state(self) -> bytes | None:
        """Return the session state."""
        return self._session.state

    async def set_state(self, state: bytes | None) -> None:
        """Replace the session state."""
        self._session.state = state

    async def renew_lock(self) -> datetime:
        """Return the current time: memory locks never expire."""
        return datetime.now(UTC)

    async def close(self) -> None:
        """Unlock the session, returning unsettled messages to its head in order."""
        if self._closed:
            return
        self._closed = True
        unsettled = sorted(self._in_flight.values(), key=lambda m: m.sequence_number)
        for stored in reversed(unsettled):
            if stored.deferred:
                self._session.deferred[stored.sequence_number] = stored
            else:
                self._session.pending.insert(0, stored)
        self._in_flight.clear()
        self._session.locked = False
        await self._broker._notify()


class MemoryTransport:
    """A `Transport` over a `MemoryBroker`."""

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker

    @property
    def entity(self) -> str:
        """Name of the in-memory entity."""
        return self._broker.entity

    async def accept_session(self, max_wait_s: float) -> MemorySessionReceiver | None:
        """Lock the next session with pending messages, or None after `max_wait_s`."""
        broker = self._broker
        session_id = broker._next_free_session()
        if session_id is None:
            session_id = await broker._wait_for(broker._next_free_session, max_wait_s)
        if session_id is None:
            return None
        broker.sessions[session_id].locked = True
        return MemorySessionReceiver(broker, session_id)

    async def close(self) -> None:
        """Nothing to release: the broker outlives its transports."""
