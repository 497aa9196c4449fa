"""The broker state machine: entities, receivers, locks and timers, with no I/O.

The protocol edge calls these methods on one thread and then reads `drain_events()`
to learn which receivers to feed, which pending session accepts were granted and which
session locks were lost. Time comes from the injectable `clock` (seconds), and
`next_deadline()` / `fire_deadlines()` let the edge run lock expiry on its own timer.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterable

from localbus.config import EntityConfig
from localbus.deadlines import DeadlineQueue
from localbus.errors import (
    NOT_ALLOWED,
    NOT_FOUND,
    BrokerError,
)
from localbus.expiry import DeadlineHandling
from localbus.journal import Journal, NullJournal
from localbus.messages import (
    Delivery,
    IncomingMessage,
    Message,
    MessageStatus,
    MessageStore,
)
from localbus.records import (
    AttachResult,
    Event,
    MessagesReady,
    Outcome,
    Receiver,
)
from localbus.routing import SendTarget, build_targets
from localbus.sessions import SessionLocking

DEAD_LETTER_SUFFIX = "/$deadletterqueue"
MAX_DELIVERY_COUNT_REASON = "MaxDeliveryCountExceeded"
TTL_EXPIRED_REASON = "TTLExpiredException"


class BrokerState(SessionLocking, DeadlineHandling):
    """All entities of one broker and the rules that move their messages."""

    def __init__(
        self,
        entities: Iterable[EntityConfig],
        clock: Callable[[], float] = time.time,
        journal: Journal | None = None,
    ) -> None:
        self._clock = clock
        self._journal: Journal = journal or NullJournal()
        self.targets: dict[str, SendTarget] = {}
        self.stores: dict[str, MessageStore] = {}
        self.dead_letter_stores: dict[str, MessageStore] = {}
        for entity in entities:
            self.add_entity(entity)
        for entity in self._journal.stored_entities():
            if entity.name.lower() not in self.targets:
                self.add_entity(entity)
        self._sequence = itertools.count(self._journal.last_sequence_number() + 1)
        self._receivers: dict[int, Receiver] = {}
        self._listeners: dict[str, dict[int, None]] = {}
        self._waiting: dict[str, dict[int, None]] = {}
        self._events: list[Event] = []
        self._deadlines = DeadlineQueue()
        self.scheduled: dict[int, tuple[str, IncomingMessage]] = {}
        self._restore()

    # Entities -----------------------------------------------------------------

    def add_entity(self, entity: EntityConfig) -> None:
        """Create the stores and send target of a queue or topic."""
        target = build_targets(entity)
        self.targets[entity.name.lower()] = target
        for path, settings in target.store_settings.items():
            store = MessageStore(path, settings)
            self.stores[path] = store
            dead_letter = MessageStore(
                path + DEAD_LETTER_SUFFIX,
                type(settings)(
                    requires_session=False,
                    lock_duration_s=settings.lock_duration_s,
                    max_delivery_count=settings.max_delivery_count,
                ),
            )
            self.stores[dead_letter.name] = dead_letter
            self.dead_letter_stores[path] = dead_letter
        self._journal.entity_added(entity)

    def store_for(self, path: str) -> MessageStore:
        """Return the receivable queue at `path` (case-insensitive)."""
        store = self.stores.get(path.lower().strip("/"))
        if store is None:
            raise BrokerError(NOT_FOUND, f"the messaging entity {path!r} was not found")
        return store

    def target_for(self, path: str) -> SendTarget:
        """Return the queue or topic that accepts messages sent to `path`."""
        target = self.targets.get(path.lower().strip("/"))
        if target is None:
            raise BrokerError(NOT_FOUND, f"the messaging entity {path!r} was not found")
        return target

    def now_ms(self) -> int:
        """Current time of the injected clock in epoch milliseconds."""
        return int(self._clock() * 1000)

    # Sending ------------------------------------------------------------------

    def send(self, path: str, incoming: list[IncomingMessage]) -> list[int]:
        """Store messages sent to `path` and return their sequence numbers.

        A duplicate message id inside the target's detection window is accepted and
        dropped, so its returned sequence number is 0.
        """
        target = self.target_for(path)
        for message in incoming:
            self._check_session_id(target, message)
        now = self.now_ms()
        numbers = []
        for message in incoming:
            if target.is_duplicate(message.message_id, now):
                numbers.append(0)
                continue
            sequence_number = next(self._sequence)
            numbers.append(sequence_number)
            scheduled = message.scheduled_at_ms
            if scheduled is not None and scheduled > now:
                self._schedule(target, message, sequence_number, scheduled)
            else:
                self._route(target, message, sequence_number, now)
        return numbers

    def _check_session_id(self, target: SendTarget, message: IncomingMessage) -> None:
        if message.session_id is not None:
            return
        for path in target.matching_stores(message):
            if self.stores[path].requires_session:
                raise BrokerError(
                    NOT_ALLOWED,
                    f"{path} requires sessions but the message has no session id; "
                    "set session_id on the message",
                )

    def cancel_scheduled(self, path: str, sequence_numbers: list[int]) -> None:
        """Drop scheduled messages of `path` before they are enqueued."""
        target = self.target_for(path)
        for number in sequence_numbers:
            entry = self.scheduled.get(number)
            if entry is None or entry[0] != target.name:
                continue
            del self.scheduled[number]
            self._journal.scheduled_removed(number)

    def _schedule(
        self, target: SendTarget, message: IncomingMessage, number: int, at_ms: int
    ) -> None:
        # `number` identifies the scheduled message until it is due, for
        # cancel-scheduled-message. `_activate_scheduled` enqueues it under a new one.
        self.scheduled[number] = (target.name, message)
        self._journal.scheduled_stored(target.name, number, message)
        self._add_deadline(at_ms, "scheduled", target.name, number)

    def _route(
        self, target: SendTarget, message: IncomingMessage, number: int, now: int
    ) -> None:
        for path in target.matching_stores(message):
            store = self.stores[path]
            stored = self._new_message(message, number, now, store)
            store.add(stored)
            self._journal.message_stored(store.name, stored)
            if stored.expires_at_ms is not None:
                self._add_deadline(stored.expires_at_ms, "ttl", store.name, number)
            self._wake(store, stored.session_id)

    def _new_message(
        self,
        message: IncomingMessage,
        number: int,
        enqueued_at_ms: int,
        store: MessageStore | None = None,
    ) -> Message:
        ttl_s = message.ttl_s
        default_ttl = store.settings.default_ttl_s if store else None
        if default_ttl is not None:
            ttl_s = default_ttl if ttl_s is None else min(ttl_s, default_ttl)
        return Message(
            sequence_number=number,
            payload=message.payload,
            message_id=message.message_id,
            session_id=message.session_id,
            enqueued_at_ms=enqueued_at_ms,
            expires_at_ms=(
                enqueued_at_ms + int(ttl_s * 1000) if ttl_s is not None else None
            ),
            scheduled_at_ms=message.scheduled_at_ms,
        )

    # Receivers ----------------------------------------------------------------

    def attach_receiver(
        self,
        receiver_id: int,
        path: str,
        *,
        session_id: str | None = None,
        session_filter: bool = False,
        receive_and_delete: bool = False,
    ) -> AttachResult:
        """Register a receive link; lock the named or next available session.

        `session_filter` is true when the link requested a session. Then a
        `session_id` of None means next available, and `AttachResult.waiting` is
        true while no session can be granted.
        """
        store = self.store_for(path)
        if store.requires_session and not session_filter:
            raise BrokerError(
                NOT_ALLOWED,
                f"{store.name} requires sessions; accept a session to receive from it",
            )
        if session_filter and not store.requires_session:
            raise BrokerError(
                NOT_ALLOWED,
                f"{store.name} does not require sessions; receive without a session id",
            )
        receiver = Receiver(receiver_id, store, receive_and_delete)
        if not store.requires_session:
            self._receivers[receiver_id] = receiver
            self._listeners.setdefault(store.name, {})[receiver_id] = None
            self._events.append(MessagesReady(receiver_id))
            return AttachResult(None, None)
        if session_id is not None:
            return self._accept_named(store, session_id, receiver)
        return self._accept_next_available(store, receiver)

    def cancel_accept(self, receiver_id: int) -> bool:
        """Give up a waiting next-available accept; false when it was granted."""
        receiver = self._receivers.get(receiver_id)
        if receiver is None or not receiver.waiting:
            return False
        self._waiting.get(receiver.store.name, {}).pop(receiver_id, None)
        del self._receivers[receiver_id]
        return True

    def detach_receiver(self, receiver_id: int) -> None:
        """Forget a receive link and return what it held, in sequence order."""
        receiver = self._receivers.pop(receiver_id, None)
        if receiver is None:
            return
        store = receiver.store
        self._waiting.get(store.name, {}).pop(receiver_id, None)
        self._listeners.get(store.name, {}).pop(receiver_id, None)
        if store.requires_session and receiver.session_id is not None:
            session = store.sessions.get(receiver.session_id)
            if session is not None and session.holder == receiver_id:
                self._release_session(store, session)
            return
        for number in sorted(receiver.unsettled):
            message = store.messages.get(number)
            if message is not None and message.holder == receiver_id:
                self._return_failed(store, message)

    def receive(self, receiver_id: int) -> Delivery | None:
        """Take the next message for the receiver, locked or deleted per its mode."""
        receiver = self._receivers.get(receiver_id)
        if receiver is None or receiver.waiting or receiver.lost:
            return None
        store = receiver.store
        now = self.now_ms()
        message = self._next_live_message(store, receiver.session_id, now)
        if message is None:
            return None
        if receiver.receive_and_delete:
            store.remove(message.sequence_number)
            self._journal.message_removed(store.name, message.sequence_number)
            return Delivery.of(message)
        if store.requires_session:
            locked_until = store.sessions[receiver.session_id or ""].locked_until_ms
        else:
            locked_until = now + int(store.settings.lock_duration_s * 1000)
            self._add_deadline(
                locked_until, "message", store.name, message.sequence_number
            )
        store.lock(message, receiver_id, locked_until)
        self._journal.message_locked(store.name, message.sequence_number)
        receiver.unsettled.add(message.sequence_number)
        return Delivery.of(message)

    def _next_live_message(
        self, store: MessageStore, session_id: str | None, now: int
    ) -> Message | None:
        while True:
            message = store.pop_available(session_id)
            if message is None:
                return None
            if message.expires_at_ms is None or message.expires_at_ms > now:
                return message
            self._expire_ttl(store, message)

    # Settlement ---------------------------------------------------------------

    def settle(
        self,
        path: str,
        token: uuid.UUID,
        outcome: Outcome,
        reason: str | None = None,
        description: str | None = None,
        requester: frozenset[int] | None = None,
    ) -> None:
        """Apply a settlement outcome to the message locked under `token`.

        With `requester`, a message of a session is settled only when one of those
        receivers holds the session (see `held_session`).
        """
        store = self.store_for(path)
        message = store.locked_message(token, self.now_ms())
        if store.requires_session and requester is not None:
            self.held_session(path, message.session_id or "", requester)
        holder = self._receivers.get(message.holder or -1)
        if holder is not None:
            holder.unsettled.discard(message.sequence_number)
        if outcome is Outcome.COMPLETE:
            store.remove(message.sequence_number)
            self._journal.message_removed(store.name, message.sequence_number)
        elif outcome is Outcome.ABANDON:
            self._return_failed(store, message)
        elif outcome is Outcome.DEFER:
            store.defer(message)
            self._journal.message_stored(store.name, message)
        else:
            self._dead_letter(store, message, reason or "", description or "")

    def _return_failed(self, store: MessageStore, message: Message) -> None:
        """Count a failed delivery and put the message back, or dead-letter it."""
        message.delivery_count += 1
        if self._dead_letter_if_exhausted(store, message):
            return
        if message.status is MessageStatus.DEFERRED_LOCKED:
            store.defer(message)
        else:
            store.make_available(message)
            self._wake(store, message.session_id)
        self._journal.message_stored(store.name, message)

    def _dead_letter_if_exhausted(self, store: MessageStore, message: Message) -> bool:
        """Dead-letter `message` once its delivery count reached the max; tell if so."""
        limit = store.settings.max_delivery_count
        if store.name not in self.dead_letter_stores or message.delivery_count < limit:
            return False
        self._dead_letter(
            store,
            message,
            MAX_DELIVERY_COUNT_REASON,
            f"Message could not be consumed after {limit} delivery attempts.",
        )
        return True

    def _dead_letter(
        self, store: MessageStore, message: Message, reason: str, description: str
    ) -> None:
        store.remove(message.sequence_number)
        self._journal.message_removed(store.name, message.sequence_number)
        # A dead-letter queue has no dead-letter queue, so a message dead-lettered
        # there stays in it with the new reason.
        dead_letter = self.dead_letter_stores.get(store.name, store)
        message.status = MessageStatus.AVAILABLE
        message.dead_letter_reason = reason
        message.dead_letter_description = description
        if dead_letter is not store:
            message.dead_letter_source = store.name
        message.expires_at_ms = None
        dead_letter.add(message)
        self._journal.message_stored(dead_letter.name, message)
        self._wake(dead_letter, None)

    def _expire_ttl(self, store: MessageStore, message: Message) -> None:
        if store.settings.dead_letter_on_expiration:
            self._dead_letter(
                store,
                message,
                TTL_EXPIRED_REASON,
                "The message expired and was dead lettered.",
            )
            return
        store.remove(message.sequence_number)
        self._journal.message_removed(store.name, message.sequence_number)

    def _add_deadline(self, at_ms: int, kind: str, name: str, key: object) -> None:
        self._deadlines.add(at_ms, kind, name, key)

    def _count_lost_lock(self, store: MessageStore, message: Message) -> None:
        """Count the delivery of a message whose lock a previous run held at its end.

        As with an expired lock, the message is dead-lettered when the count
        reaches the max delivery count, and stays available or deferred otherwise.
        """
        message.delivery_count += 1
        if self._dead_letter_if_exhausted(store, message):
            return
        self._journal.message_stored(store.name, message)

    def _wake(self, store: MessageStore, session_id: str | None) -> None:
        if not store.requires_session:
            for receiver_id in self._listeners.get(store.name, {}):
                self._events.append(MessagesReady(receiver_id))
            return
        session = store.sessions.get(session_id or "")
        if session is not None and session.holder is not None:
            self._events.append(MessagesReady(session.holder))
        else:
            self._grant_waiting(store)

    def _restore(self) -> None:
        for store_name, message in self._journal.stored_messages():
            store = self.stores.get(store_name)
            if store is None:
                continue
            if message.status is not MessageStatus.DEFERRED:
                message.status = MessageStatus.AVAILABLE
            store.add(message)
            if message.expires_at_ms is not None:
                self._add_deadline(
                    message.expires_at_ms, "ttl", store.name, message.sequence_number
                )
        for store_name, number in self._journal.locked_messages():
            store = self.stores.get(store_name)
            locked = store.messages.get(number) if store is not None else None
            if store is not None and locked is not None:
                self._count_lost_lock(store, locked)
        for store_name, session_id, state in self._journal.session_states():
            store = self.stores.get(store_name)
            if store is not None:
                store.session(session_id).state = state
        for target_name, number, incoming in self._journal.scheduled_messages():
            self.scheduled[number] = (target_name, incoming)
            self._add_deadline(
                incoming.scheduled_at_ms or 0, "scheduled", target_name, number
            )
