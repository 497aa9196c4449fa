"""The journal interface the state machine writes every durable change to."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from localbus.config import EntityConfig
from localbus.messages import IncomingMessage, Message


class Journal(Protocol):
    """Durable record of entities, messages, session state and scheduled messages.

    `message_locked` records that a message was delivered under a lock. The next
    `message_stored` or `message_removed` of that message ends the record, so the
    messages still recorded at start-up are those whose lock the broker lost.
    """

    def entity_added(self, entity: EntityConfig) -> None: ...

    def message_stored(self, store: str, message: Message) -> None: ...

    def message_removed(self, store: str, sequence_number: int) -> None: ...

    def message_locked(self, store: str, sequence_number: int) -> None: ...

    def session_state_stored(
        self, store: str, session_id: str, state: bytes | None
    ) -> None: ...

    def scheduled_stored(
        self, target: str, sequence_number: int, message: IncomingMessage
    ) -> None: ...

    def scheduled_removed(self, sequence_number: int) -> None: ...

    def last_sequence_number(self) -> int: ...

    def stored_entities(self) -> list[EntityConfig]: ...

    def stored_messages(self) -> Iterable[tuple[str, Message]]: ...

    def locked_messages(self) -> Iterable[tuple[str, int]]: ...

    def session_states(self) -> Iterable[tuple[str, str, bytes]]: ...

    def scheduled_messages(self) -> Iterable[tuple[str, int, IncomingMessage]]: ...


class NullJournal:
    """Journal of an in-memory broker: records nothing, restores nothing."""

    def entity_added(self, entity: EntityConfig) -> None:
        return None

    def message_stored(self, store: str, message: Message) -> None:
        return None

    def message_removed(self, store: str, sequence_number: int) -> None:
        return None

    def message_locked(self, store: str, sequence_number: int) -> None:
        return None

    def session_state_stored(
        self, store: str, session_id: str, state: bytes | None
    ) -> None:
        return None

    def scheduled_stored(
        self, target: str, sequence_number: int, message: IncomingMessage
    ) -> None:
        return None

    def scheduled_removed(self, sequence_number: int) -> None:
        return None

    def last_sequence_number(self) -> int:
        return 0

    def stored_entities(self) -> list[EntityConfig]:
        return []

    def stored_messages(self) -> Iterable[tuple[str, Message]]:
        return ()

    def locked_messages(self) -> Iterable[tuple[str, int]]:
        return ()

    def session_states(self) -> Iterable[tuple[str, str, bytes]]:
        return ()

    def scheduled_messages(self) -> Iterable[tuple[str, int, IncomingMessage]]:
        return ()
