"""Records the broker state machine exchanges with the protocol edge."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from localbus.messages import MessageStore


class Outcome(Enum):
    """Settlement outcomes a receiver can choose for a locked message."""

    COMPLETE = "completed"
    ABANDON = "abandoned"
    DEFER = "defered"
    DEAD_LETTER = "suspended"


@dataclass(frozen=True)
class MessagesReady:
    """The receiver may have messages to pull now."""

    receiver_id: int


@dataclass(frozen=True)
class SessionGranted:
    """A waiting next-available accept got a session."""

    receiver_id: int
    session_id: str
    locked_until_ms: int


@dataclass(frozen=True)
class SessionLost:
    """The receiver's session lock expired; its link must be detached."""

    receiver_id: int
    session_id: str


Event = MessagesReady | SessionGranted | SessionLost


@dataclass
class Receiver:
    """State machine record of one receive link."""

    receiver_id: int
    store: MessageStore
    receive_and_delete: bool
    session_id: str | None = None
    waiting: bool = False
    lost: bool = False
    unsettled: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class AttachResult:
    """Result of a receive attach: the locked session, or that the accept waits."""

    session_id: str | None
    locked_until_ms: int | None
    waiting: bool = False
