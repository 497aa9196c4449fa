"""Messages, sessions and the per-queue store of the broker state machine.

A `MessageStore` is one receivable queue: a queue, a topic subscription or a
`$DeadLetterQueue`. It orders messages by sequence number, per session when the queue
requires sessions, and always hands out the lowest available sequence number first, so
an abandoned or released message goes back to the head of its session.
"""

from __future__ import annotations

import heapq
import uuid
from dataclasses import dataclass, field
from enum import Enum

from localbus.config import QueueSettings
from localbus.errors import MESSAGE_LOCK_LOST, SESSION_LOCK_LOST, BrokerError


class MessageStatus(Enum):
    """Life-cycle state of a stored message."""

    AVAILABLE = "available"
    LOCKED = "locked"
    DEFERRED = "deferred"
    DEFERRED_LOCKED = "deferred_locked"
    SCHEDULED = "scheduled"


@dataclass(frozen=True)
class IncomingMessage:
    """A message as a sender submitted it, with the fields the broker routes on."""

    payload: bytes
    message_id: str | None = None
    session_id: str | None = None
    subject: str | None = None
    correlation_id: str | None = None
    to: str | None = None
    reply_to: str | None = None
    content_type: str | None = None
    application_properties: tuple[tuple[str, object], ...] = ()
    ttl_s: float | None = None
    scheduled_at_ms: int | None = None


@dataclass
class Message:
    """A stored message. `delivery_count` counts failed deliveries so far."""

    sequence_number: int
    payload: bytes
    message_id: str | None
    session_id: str | None
    enqueued_at_ms: int
    expires_at_ms: int | None = None
    scheduled_at_ms: int | None = None
    delivery_count: int = 0
    status: MessageStatus = MessageStatus.AVAILABLE
    lock_token: uuid.UUID | None = None
    locked_until_ms: int = 0
    holder: int | None = None
    dead_letter_reason: str | None = None
    dead_letter_description: str | None = None
    dead_letter_source: str | None = None


@dataclass(frozen=True)
class Delivery:
    """Payload and broker fields that the protocol edge sends for one message."""

    sequence_number: int
    payload: bytes
    session_id: str | None
    enqueued_at_ms: int
    delivery_count: int
    lock_token: uuid.UUID | None
    locked_until_ms: int
    scheduled_at_ms: int | None
    dead_letter_reason: str | None
    dead_letter_description: str | None
    dead_letter_source: str | None

    @classmethod
    def of(cls, message: Message) -> Delivery:
        """Snapshot `message` as it is now."""
        return cls(
            sequence_number=message.sequence_number,
            payload=message.payload,
            session_id=message.session_id,
            enqueued_at_ms=message.enqueued_at_ms,
            delivery_count=message.delivery_count,
            lock_token=message.lock_token,
            locked_until_ms=message.locked_until_ms,
            scheduled_at_ms=message.scheduled_at_ms,
            dead_letter_reason=message.dead_letter_reason,
            dead_letter_description=message.dead_letter_description,
            dead_letter_source=message.dead_letter_source,
        )


@dataclass
class Session:
    """One session of a session-enabled queue: its FIFO, lock and state."""

    session_id: str
    available: list[int] = field(default_factory=list)
    state: bytes | None = None
    holder: int | None = None
    locked_until_ms: int = 0
    locked: set[int] = field(default_factory=set)


class MessageStore:
    """The messages of one receivable queue and their locks."""

    def __init__(self, name: str, settings: QueueSettings) -> None:
        self.name = name
        self.settings = settings
        self.messages: dict[int, Message] = {}
        self.sessions: dict[str, Session] = {}
        # Unlocked sessions with available messages, oldest first.
        self.ready_sessions: dict[str, None] = {}
        self._available: list[int] = []
        self._locks: dict[uuid.UUID, int] = {}

    @property
    def requires_session(self) -> bool:
        """Whether receivers must lock a session to receive."""
        return self.settings.requires_session

    def session(self, session_id: str) -> Session:
        """Return the session `session_id`, creating an empty one."""
        existing = self.sessions.get(session_id)
        if existing is None:
            existing = Session(session_id)
            self.sessions[session_id] = existing
        return existing

    def add(self, message: Message) -> None:
        """Store `message`, available at once unless it is scheduled or deferred."""
        self.messages[message.sequence_number] = message
        if message.status is MessageStatus.AVAILABLE:
            self.make_available(message)

    def make_available(self, message: Message) -> None:
        """Put `message` back in line, at its sequence position."""
        message.status = MessageStatus.AVAILABLE
        self._unlock(message)
        if self.requires_session:
            session = self.session(message.session_id or "")
            session.locked.discard(message.sequence_number)
            heapq.heappush(session.available, message.sequence_number)
            if session.holder is None:
                self.ready_sessions[session.session_id] = None
        else:
            heapq.heappush(self._available, message.sequence_number)

    def remove(self, sequence_number: int) -> Message | None:
        """Delete a message; stale heap entries are skipped when popped."""
        message = self.messages.pop(sequence_number, None)
        if message is None:
            return None
        self._unlock(message)
        if message.session_id is not None and self.requires_session:
            session = self.sessions.get(message.session_id)
            if session is not None:
                session.locked.discard(sequence_number)
        return message

    def pop_available(self, session_id: str | None) -> Message | None:
        """Return the lowest available message of the session (or queue), or None."""
        if self.requires_session:
            session = self.sessions.get(session_id or "")
            heap = session.available if session else []
        else:
            heap = self._available
        while heap:
            sequence_number = heapq.heappop(heap)
            message = self.messages.get(sequence_number)
            if message is not None and message.status is MessageStatus.AVAILABLE:
                return message
        return None

    def has_available(self, session_id: str | None) -> bool:
        """Tell whether `pop_available` would return a message; drop stale entries."""
        if self.requires_session:
            session = self.sessions.get(session_id or "")
            heap = session.available if session else []
        else:
            heap = self._available
        while heap:
            message = self.messages.get(heap[0])
            if message is not None and message.status is MessageStatus.AVAILABLE:
                return True
            heapq.heappop(heap)
        return False

    def lock(self, message: Message, holder: int, locked_until_ms: int) -> None:
        """Lock `message` for `holder` under a fresh lock token."""
        token = uuid.uuid4()
        deferred = message.status in (
            MessageStatus.DEFERRED,
            MessageStatus.DEFERRED_LOCKED,
        )
        message.status = (
            MessageStatus.DEFERRED_LOCKED if deferred else MessageStatus.LOCKED
        )
        message.lock_token = token
        message.locked_until_ms = locked_until_ms
        message.holder = holder
        self._locks[token] = message.sequence_number
        if self.requires_session and message.session_id is not None:
            self.session(message.session_id).locked.add(message.sequence_number)

    def locked_message(self, token: uuid.UUID, now_ms: int) -> Message:
        """Return the message locked under `token`, or raise the lock-lost error."""
        sequence_number = self._locks.get(token)
        message = (
            self.messages.get(sequence_number) if sequence_number is not None else None
        )
        if message is None or message.lock_token != token:
            raise BrokerError(
                MESSAGE_LOCK_LOST,
                f"the lock {token} on {self.name} is unknown, expired or already "
                "settled; receive the message again",
            )
        if self.requires_session:
            session = self.sessions.get(message.session_id or "")
            if session is None or session.holder is None:
                raise BrokerError(
                    SESSION_LOCK_LOST,
                    f"the lock on session {message.session_id!r} of {self.name} "
                    "was lost; accept the session again",
                )
        elif message.locked_until_ms <= now_ms:
            raise BrokerError(
                MESSAGE_LOCK_LOST,
                f"the lock {token} on {self.name} expired; receive the message again",
            )
        return message

    def defer(self, message: Message) -> None:
        """Set `message` aside until it is received by sequence number."""
        self._unlock(message)
        message.status = MessageStatus.DEFERRED
        if self.requires_session and message.session_id is not None:
            self.session(message.session_id).locked.discard(message.sequence_number)

    def ordered(self, from_sequence: int, session_id: str | None) -> list[Message]:
        """Return the messages from `from_sequence` on, in sequence order."""
        selected = [
            message
            for number, message in self.messages.items()
            if number >= from_sequence
            and (session_id is None or message.session_id == session_id)
        ]
        selected.sort(key=lambda message: message.sequence_number)
        return selected

    def _unlock(self, message: Message) -> None:
        if message.lock_token is not None:
            self._locks.pop(message.lock_token, None)
        message.lock_token = None
        message.locked_until_ms = 0
        message.holder = None
