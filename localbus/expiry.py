"""Lock, TTL and schedule deadlines of the broker state machine.

`fire_deadlines()` runs the deadlines that are due on the injected clock, and
`expire_session_locks()` makes held session locks due at once, for fault injection.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

from localbus.deadlines import DeadlineQueue
from localbus.messages import (
    IncomingMessage,
    Message,
    MessageStatus,
    MessageStore,
    Session,
)
from localbus.records import Event, Receiver, SessionLost

if TYPE_CHECKING:
    from localbus.journal import Journal
    from localbus.routing import SendTarget

log = logging.getLogger("localbus")


class DeadlineHandling:
    """Deadline handling, mixed into `BrokerState`."""

    stores: dict[str, MessageStore]
    targets: dict[str, SendTarget]
    scheduled: dict[int, tuple[str, IncomingMessage]]
    _receivers: dict[int, Receiver]
    _events: list[Event]
    _deadlines: DeadlineQueue
    _journal: Journal
    _sequence: itertools.count[int]

    if TYPE_CHECKING:

        def now_ms(self) -> int: ...

        def _release_session(self, store: MessageStore, session: Session) -> None: ...

        def _return_failed(self, store: MessageStore, message: Message) -> None: ...

        def _expire_ttl(self, store: MessageStore, message: Message) -> None: ...

        def _route(
            self, target: SendTarget, message: IncomingMessage, number: int, now: int
        ) -> None: ...

    def drain_events(self) -> list[Event]:
        """Return and forget the events produced since the last call."""
        events, self._events = self._events, []
        return events

    def next_deadline(self) -> float | None:
        """Epoch seconds of the earliest pending lock, TTL or schedule deadline."""
        at_ms = self._deadlines.next_at_ms()
        return at_ms / 1000 if at_ms is not None else None

    def fire_deadlines(self) -> None:
        """Expire every lock, TTL and scheduled enqueue that is due."""
        now = self.now_ms()
        while (deadline := self._deadlines.pop_due(now)) is not None:
            kind, name, key = deadline.kind, deadline.store, deadline.key
            if kind == "scheduled":
                self._activate_scheduled(key, now)
                continue
            store = self.stores.get(name)
            if store is None:
                continue
            if kind == "session":
                if self._expire_session(store, str(key), now):
                    # No renewal came in time. The chaos harness reads these lines
                    # to tell such expiries from the ones it injects.
                    log.info(
                        "session_lock_expired store=%s session=%s at_ms=%s",
                        store.name,
                        key,
                        now,
                    )
            elif kind == "message":
                self._expire_message_lock(store, key, now)
            else:
                self._expire_ttl_deadline(store, key, now)

    def _expire_session(self, store: MessageStore, session_id: str, now: int) -> bool:
        """Release the session if its lock is due; return whether it was."""
        session = store.sessions.get(session_id)
        if session is None or session.holder is None or session.locked_until_ms > now:
            return False
        receiver = self._receivers.get(session.holder)
        if receiver is not None:
            receiver.lost = True
            self._events.append(SessionLost(receiver.receiver_id, session_id))
        self._release_session(store, session)
        return True

    def _expire_ttl_deadline(self, store: MessageStore, key: object, now: int) -> None:
        message = store.messages.get(key)  # type: ignore[call-overload]
        if message is None or message.expires_at_ms is None:
            return
        idle = message.status in (MessageStatus.AVAILABLE, MessageStatus.DEFERRED)
        if idle and message.expires_at_ms <= now:
            self._expire_ttl(store, message)

    def _expire_message_lock(self, store: MessageStore, key: object, now: int) -> None:
        message = store.messages.get(key)  # type: ignore[call-overload]
        if message is None or message.lock_token is None:
            return
        if message.locked_until_ms > now:
            return
        receiver = self._receivers.get(message.holder or -1)
        if receiver is not None:
            receiver.unsettled.discard(message.sequence_number)
        self._return_failed(store, message)

    def _activate_scheduled(self, key: object, now: int) -> None:
        """Enqueue a due scheduled message as if it were sent now.

        Service Bus gives it a new sequence number at this point (Azure docs,
        "Message sequencing and timestamps"), so it goes behind every message
        enqueued before, also in its session.
        """
        entry = self.scheduled.pop(key, None)  # type: ignore[call-overload]
        if entry is None:
            return
        target_name, message = entry
        # Stored first and unscheduled second: a crash in between enqueues the
        # message twice after the restart, rather than losing it.
        self._route(self.targets[target_name], message, next(self._sequence), now)
        self._journal.scheduled_removed(int(key))  # type: ignore[call-overload]

    def expire_session_locks(
        self, entity: str | None = None, session_id: str | None = None
    ) -> list[str]:
        """Expire held session locks now, as if their lock duration had passed.

        `entity` limits this to a queue or a topic's subscriptions and `session_id`
        to one session. Returns the ids of the sessions whose lock expired.
        """
        prefix = None if entity is None else entity.strip("/").lower()
        now = self.now_ms()
        expired = []
        for store in list(self.stores.values()):
            if not store.requires_session:
                continue
            if prefix is not None and store.name.split("/", 1)[0] != prefix:
                continue
            for session in list(store.sessions.values()):
                if session.holder is None:
                    continue
                if session_id is not None and session.session_id != session_id:
                    continue
                session.locked_until_ms = now
                self._expire_session(store, session.session_id, now)
                expired.append(session.session_id)
        return expired
