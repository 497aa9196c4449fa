"""Session locks, lock renewal and session state of the broker state machine."""

from __future__ import annotations

import logging
import uuid

from localbus.errors import SESSION_CANNOT_BE_LOCKED, SESSION_LOCK_LOST, BrokerError
from localbus.journal import Journal
from localbus.messages import Message, MessageStore, Session
from localbus.records import (
    AttachResult,
    Event,
    MessagesReady,
    Receiver,
    SessionGranted,
)

log = logging.getLogger("localbus")


class SessionLocking:
    """Session and message lock handling, mixed into `BrokerState`."""

    _receivers: dict[int, Receiver]
    _waiting: dict[str, dict[int, None]]
    _events: list[Event]
    _journal: Journal

    def now_ms(self) -> int:
        raise NotImplementedError

    def store_for(self, path: str) -> MessageStore:
        raise NotImplementedError

    def _add_deadline(self, at_ms: int, kind: str, name: str, key: object) -> None:
        raise NotImplementedError

    def _return_failed(self, store: MessageStore, message: Message) -> None:
        raise NotImplementedError

    def _accept_named(
        self, store: MessageStore, session_id: str, receiver: Receiver
    ) -> AttachResult:
        session = store.session(session_id)
        if session.holder is not None:
            raise BrokerError(
                SESSION_CANNOT_BE_LOCKED,
                f"session {session_id!r} of {store.name} is locked by another "
                "receiver; retry after its lock is released or expires",
            )
        self._receivers[receiver.receiver_id] = receiver
        until = self._lock_session(store, session, receiver)
        return AttachResult(session_id, until)

    def _accept_next_available(
        self, store: MessageStore, receiver: Receiver
    ) -> AttachResult:
        receiver_id = receiver.receiver_id
        self._receivers[receiver_id] = receiver
        receiver.waiting = True
        self._waiting.setdefault(store.name, {})[receiver_id] = None
        self._grant_waiting(store)
        if receiver.waiting:
            return AttachResult(None, None, waiting=True)
        # Granted at once: the attach reply carries the session, so drop the event.
        self._events = [
            event
            for event in self._events
            if not (
                isinstance(event, SessionGranted) and event.receiver_id == receiver_id
            )
        ]
        session = store.sessions[receiver.session_id or ""]
        return AttachResult(receiver.session_id, session.locked_until_ms)

    def _lock_session(
        self, store: MessageStore, session: Session, receiver: Receiver
    ) -> int:
        until = self.now_ms() + int(store.settings.lock_duration_s * 1000)
        session.holder = receiver.receiver_id
        session.locked_until_ms = until
        receiver.session_id = session.session_id
        receiver.waiting = False
        store.ready_sessions.pop(session.session_id, None)
        self._add_deadline(until, "session", store.name, session.session_id)
        self._events.append(MessagesReady(receiver.receiver_id))
        log.debug(
            "session_locked store=%s session=%s receiver=%s",
            store.name,
            session.session_id,
            receiver.receiver_id,
        )
        return until

    def _grant_waiting(self, store: MessageStore) -> None:
        waiting = self._waiting.get(store.name)
        while waiting and store.ready_sessions:
            session_id = next(iter(store.ready_sessions))
            del store.ready_sessions[session_id]
            session = store.sessions.get(session_id)
            if session is None or session.holder is not None:
                continue
            if not store.has_available(session_id):
                continue
            receiver_id = next(iter(waiting))
            del waiting[receiver_id]
            receiver = self._receivers[receiver_id]
            until = self._lock_session(store, session, receiver)
            self._events.append(SessionGranted(receiver_id, session_id, until))

    def _release_session(self, store: MessageStore, session: Session) -> None:
        log.debug(
            "session_unlocked store=%s session=%s receiver=%s returned=%s",
            store.name,
            session.session_id,
            session.holder,
            len(session.locked),
        )
        session.holder = None
        session.locked_until_ms = 0
        for number in sorted(session.locked):
            message = store.messages.get(number)
            if message is not None and message.lock_token is not None:
                self._return_failed(store, message)
        session.locked.clear()
        if store.has_available(session.session_id):
            store.ready_sessions[session.session_id] = None
        elif session.state is None and not any(
            message.session_id == session.session_id
            for message in store.messages.values()
        ):
            del store.sessions[session.session_id]
        self._grant_waiting(store)

    def held_session(
        self, path: str, session_id: str, requester: frozenset[int] | None = None
    ) -> tuple[MessageStore, Session]:
        """Return a held session, or raise session-lock-lost.

        `requester` contains the ids of the receivers a request comes from. When it
        is given, the session's holder must be one of them. None skips that check.
        """
        store = self.store_for(path)
        session = store.sessions.get(session_id)
        if session is None or session.holder is None:
            raise BrokerError(
                SESSION_LOCK_LOST,
                f"the lock on session {session_id!r} of {store.name} is not held; "
                "accept the session again",
            )
        if requester is not None and session.holder not in requester:
            log.info(
                "session_request_rejected store=%s session=%s holder=%s requester=%s",
                store.name,
                session_id,
                session.holder,
                sorted(requester),
            )
            raise BrokerError(
                SESSION_LOCK_LOST,
                f"the lock on session {session_id!r} of {store.name} is held by "
                "another receive link; send the request through the receiver that "
                "accepted the session",
            )
        return store, session

    def renew_session_lock(
        self, path: str, session_id: str, requester: frozenset[int] | None = None
    ) -> int:
        """Extend a held session lock by the lock duration; return the new expiry."""
        store, session = self.held_session(path, session_id, requester)
        until = self.now_ms() + int(store.settings.lock_duration_s * 1000)
        log.debug(
            "session_renewed store=%s session=%s receiver=%s",
            store.name,
            session_id,
            session.holder,
        )
        session.locked_until_ms = until
        for number in session.locked:
            message = store.messages.get(number)
            if message is not None:
                message.locked_until_ms = until
        self._add_deadline(until, "session", store.name, session_id)
        return until

    def set_session_state(
        self,
        path: str,
        session_id: str,
        state: bytes | None,
        requester: frozenset[int] | None = None,
    ) -> None:
        """Store the state of a held session (None clears it)."""
        store, session = self.held_session(path, session_id, requester)
        session.state = state
        self._journal.session_state_stored(store.name, session_id, state)

    def renew_message_lock(
        self, path: str, token: uuid.UUID, requester: frozenset[int] | None = None
    ) -> int:
        """Extend a message lock by the lock duration; return the new expiry."""
        store = self.store_for(path)
        message = store.locked_message(token, self.now_ms())
        if store.requires_session:
            return self.renew_session_lock(path, message.session_id or "", requester)
        until = self.now_ms() + int(store.settings.lock_duration_s * 1000)
        message.locked_until_ms = until
        self._add_deadline(until, "message", store.name, message.sequence_number)
        return until

    def lock_deferred(
        self, store: MessageStore, message: Message, session_id: str | None
    ) -> None:
        """Lock a deferred message for a receive by sequence number."""
        if store.requires_session:
            session = store.sessions[session_id or ""]
            until = session.locked_until_ms
            holder = session.holder or 0
        else:
            until = self.now_ms() + int(store.settings.lock_duration_s * 1000)
            holder = 0
            self._add_deadline(until, "message", store.name, message.sequence_number)
        store.lock(message, holder, until)
        self._journal.message_locked(store.name, message.sequence_number)

    def remove_message(self, store: MessageStore, message: Message) -> None:
        """Delete a message for good, as complete and receive-and-delete do."""
        store.remove(message.sequence_number)
        self._journal.message_removed(store.name, message.sequence_number)
