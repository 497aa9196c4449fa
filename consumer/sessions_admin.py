"""Parked orders and resubmitting dead-lettered messages into their own sessions.

A tool that resubmits a message must not let it run out of order. Service Bus gives a
resubmitted copy a new, higher sequence number, so simply sending it would put it
behind every later event of the order. The tools here therefore hold the order's
session while they work and leave it in a state that the unchanged processor resumes
in the right order:

1. Send a resume message, then the copies, into the session. Each copy has the
   original body, message id, subject, correlation id, content type and application
   properties, plus `orders-consumer-resubmitted-from` (the dead-lettered sequence
   number) and `orders-consumer-original-sequence-number`.
2. Receive the session's active messages up to the last copy and defer them. Only the
   resume message stays active, so that a consumer accepts the session.
3. Write the session state. The deferred list is in original order: each copy at the
   place of the message it replaces, then the messages deferred while the order was
   parked, then later ones. The park record is cleared, the resume message's id is
   added to the recent message ids, and an `unpark` record describes the request.
4. Complete the originals in the dead-letter queue.

The processor accepts the session because of the resume message, resumes the deferred
list first, and then completes the resume message as already handled: its sequence
number is below the copies' and its id is in the checkpoint.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver
from azure.servicebus.exceptions import (
    OperationTimeoutError,
    ServiceBusError,
    SessionCannotBeLockedError,
)

from consumer.checkpoint import (
    MAX_RECENT_MESSAGE_IDS,
    CheckpointError,
    SessionCheckpoint,
)
from consumer.config import Settings
from consumer.dlq import (
    PAGE_SIZE,
    DeadLetteredMessage,
    DeadLetterQueue,
    DeadLetterToolError,
    Locked,
    entity_receiver,
    failed,
    original_sequence_number,
    text_keys,
)

CONTROL_PROPERTY = "orders-consumer-control"
RESUME_SESSION = "resume-session"
RESUME_SUBJECT = "orders-consumer.resume-session"
# Marks the copies sent by one resubmit, so the tool finds exactly those.
OPERATION_PROPERTY = "orders-consumer-operation"
# Time to wait for a session lock, and for sent copies to arrive in the session.
SESSION_WAIT_S = 5.0


class SessionLocked(DeadLetterToolError):
    """The order's session is held by a running consumer."""

    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        super().__init__(
            f"order {order_id} is locked by a consumer: a running consumer holds its "
            "session. Retry after the consumer releases it (session_idle_timeout_s "
            "after its last message), or stop the consumer first."
        )


class ResubmitRejected(DeadLetterToolError):
    """A resubmit would run a message after later messages of its order."""


@dataclass(frozen=True)
class UnparkRequest:
    """The `unpark` record a tool writes into the session state next to the checkpoint.

    The processor needs none of it to resume the order, because the tool already
    arranged the deferred list. It records for an operator what the tool did, and the
    processor removes it once the deferred list is handled.
    """

    requested_at: str
    skip: bool
    dead_lettered_sequence_numbers: tuple[int, ...]
    resubmitted_message_ids: tuple[str, ...]
    resume_message_id: str | None

    def to_document(self) -> dict[str, Any]:
        """Return the JSON object stored under `unpark`."""
        return {
            "requestedAt": self.requested_at,
            "skip": self.skip,
            "deadLetteredSequenceNumbers": list(self.dead_lettered_sequence_numbers),
            "resubmittedMessageIds": list(self.resubmitted_message_ids),
            "resumeMessageId": self.resume_message_id,
        }

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> UnparkRequest:
        """Read the JSON object stored under `unpark`."""
        return cls(
            requested_at=str(document["requestedAt"]),
            skip=bool(document["skip"]),
            dead_lettered_sequence_numbers=tuple(
                int(number) for number in document["deadLetteredSequenceNumbers"]
            ),
            resubmitted_message_ids=tuple(
                str(item) for item in document["resubmittedMessageIds"]
            ),
            resume_message_id=document.get("resumeMessageId"),
        )


@dataclass(frozen=True)
class SessionState:
    """The whole session state: the processor's checkpoint and the tools' record."""

    checkpoint: SessionCheckpoint
    unpark: UnparkRequest | None = None

    def encode(self) -> bytes:
        """Return the checkpoint JSON with the `unpark` record added, as UTF-8."""
        document = json.loads(self.checkpoint.encode())
        if self.unpark is not None:
            document["unpark"] = self.unpark.to_document()
        return json.dumps(document, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, state: bytes | None) -> SessionState:
        """Read the session state. Raises `CheckpointError` when it is unreadable."""
        checkpoint = SessionCheckpoint.decode(state)
        if not state:
            return cls(checkpoint)
        record = json.loads(state.decode("utf-8")).get("unpark")
        try:
            unpark = UnparkRequest.from_document(record) if record else None
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"invalid unpark record in session state: {error}"
            ) from error
        return cls(checkpoint, unpark)


@dataclass(frozen=True)
class ResubmitResult:
    """The outcome of a resubmit or unpark for one order."""

    order_id: str
    resubmitted: tuple[int, ...]
    skipped: tuple[int, ...]
    deferred: tuple[int, ...]
    unparked: bool


@asynccontextmanager
async def hold_session(
    client: ServiceBusClient,
    settings: Settings,
    order_id: str,
    max_wait_s: float = SESSION_WAIT_S,
) -> AsyncIterator[ServiceBusReceiver]:
    """Accept the session of `order_id` by name and release it on exit.

    Raises `SessionLocked` when a running consumer has the session locked.
    """
    receiver = entity_receiver(
        client, settings, session_id=order_id, max_wait_time=max_wait_s
    )
    try:
        await receiver.__aenter__()
    except (SessionCannotBeLockedError, OperationTimeoutError):
        await receiver.close()
        raise SessionLocked(order_id) from None
    except ServiceBusError as error:
        await receiver.close()
        raise failed(f"accepting the session of order {order_id}", error) from None
    if receiver.session.locked_until_utc is None:
        # azure-servicebus 7.15.0 can report the link open before the broker's
        # refusal arrives. A granted session always carries its lock expiry.
        await receiver.close()
        raise SessionLocked(order_id)
    try:
        yield receiver
    finally:
        await receiver.close()


async def read_state(receiver: ServiceBusReceiver) -> SessionState:
    """Return the state of the held session. Raises `DeadLetterToolError`."""
    order_id = str(receiver.session.session_id)
    try:
        raw = await receiver.session.get_state()
    except ServiceBusError as error:
        raise failed(f"reading the session state of order {order_id}", error) from None
    try:
        return SessionState.decode(bytes(raw) if raw else None)
    except CheckpointError as error:
        raise DeadLetterToolError(
            f"the session state of order {order_id} is unreadable ({error}); "
            "inspect it before changing the order"
        ) from None


async def resubmit_order(
    client: ServiceBusClient,
    settings: Settings,
    order_id: str,
    sequence_numbers: Iterable[int],
) -> ResubmitResult:
    """Resubmit dead-lettered messages of one order into its session, in order.

    Raises `ResubmitRejected` when the order is not parked and its checkpoint shows a
    handled message with a higher sequence number than one of the messages, because
    the copy would then run after events that already depended on it.
    """
    _check_queue_entity(settings)
    dead_letters = DeadLetterQueue(client, settings)
    async with hold_session(client, settings, order_id) as receiver:
        state = await read_state(receiver)
        async with dead_letters.locked(sequence_numbers) as locked:
            records = locked.records()
            _check_not_ahead(order_id, state.checkpoint, records)
            return await _apply(receiver, client, settings, state, locked, skip=False)


async def unpark(
    client: ServiceBusClient, settings: Settings, order_id: str, *, skip: bool = False
) -> ResubmitResult:
    """Resume a parked order: resubmit its dead-lettered message, or skip it.

    With `skip`, the dead-lettered message is completed in the dead-letter queue
    without a copy, and the order resumes with its deferred messages. Raises
    `DeadLetterToolError` when the order is not parked.
    """
    _check_queue_entity(settings)
    dead_letters = DeadLetterQueue(client, settings)
    async with hold_session(client, settings, order_id) as receiver:
        state = await read_state(receiver)
        parked = state.checkpoint.parked
        if parked is None:
            raise DeadLetterToolError(f"order {order_id} is not parked")
        numbers = [parked.sequence_number]
        async with dead_letters.locked(numbers, require_all=False) as locked:
            if not locked.records() and not skip:
                raise DeadLetterToolError(
                    f"the message order {order_id} is parked on (sequence number "
                    f"{parked.sequence_number}) is not in {dead_letters.name}; "
                    "resume with --skip to go on without it"
                )
            return await _apply(receiver, client, settings, state, locked, skip=skip)


def _check_queue_entity(settings: Settings) -> None:
    if settings.subscription:
        raise DeadLetterToolError(
            "resubmitting into a topic subscription is not supported: a message sent "
            "to the topic would reach every subscription, not only "
            f"{settings.subscription}"
        )


def _check_not_ahead(
    order_id: str, checkpoint: SessionCheckpoint, records: list[DeadLetteredMessage]
) -> None:
    if checkpoint.parked is not None:
        return
    for record in records:
        if checkpoint.last_sequence_number > record.original_sequence_number:
            raise ResubmitRejected(
                f"rejected: resubmitting message {record.sequence_number} "
                f"(message id {record.message_id}) of order {order_id} would jump "
                "ahead of the order's checkpoint: the consumer already handled its "
                f"message {checkpoint.last_sequence_number}, and the order is not "
                "parked. Handle this message by hand, then remove it with "
                f"`dlq purge --order {order_id}`."
            )


async def _apply(
    receiver: ServiceBusReceiver,
    client: ServiceBusClient,
    settings: Settings,
    state: SessionState,
    locked: Locked,
    *,
    skip: bool,
) -> ResubmitResult:
    """Send the copies, defer the session's active messages and write the state."""
    order_id = str(receiver.session.session_id)
    records = locked.records()
    checkpoint = state.checkpoint
    operation = uuid.uuid4().hex
    extra = {OPERATION_PROPERTY: operation}
    copies = [] if skip else [record.resubmit_copy(extra) for record in records]
    clears_park = _clears_park(checkpoint, records, skip)
    needs_resume = bool(copies) or (
        clears_park and bool(checkpoint.deferred_sequence_numbers)
    )
    resume = _resume_message(order_id, operation) if needs_resume else None

    try:
        await _send(client, settings, ([resume] if resume else []) + copies)
        newly_deferred = await _defer_through_copies(receiver, operation, len(copies))
        order = await _deferred_order(receiver, checkpoint, newly_deferred)
    except ServiceBusError as error:
        raise failed(
            f"resubmitting into the session of order {order_id}", error
        ) from None

    request = UnparkRequest(
        requested_at=datetime.now(UTC).isoformat(),
        skip=skip,
        dead_lettered_sequence_numbers=tuple(r.sequence_number for r in records),
        resubmitted_message_ids=tuple(str(copy.message_id) for copy in copies),
        resume_message_id=str(resume.message_id) if resume else None,
    )
    recent = checkpoint.recent_message_ids
    if resume is not None:
        recent = (recent + (str(resume.message_id),))[-MAX_RECENT_MESSAGE_IDS:]
    new_checkpoint = replace(
        checkpoint,
        parked=None if clears_park else checkpoint.parked,
        deferred_sequence_numbers=tuple(order),
        recent_message_ids=recent,
    )
    new_state = SessionState(new_checkpoint, request)
    await _finish(receiver, locked, new_state, records)
    numbers = tuple(record.sequence_number for record in records)
    return ResubmitResult(
        order_id=order_id,
        resubmitted=() if skip else numbers,
        skipped=numbers if skip else (),
        deferred=tuple(order),
        unparked=clears_park,
    )


def _clears_park(
    checkpoint: SessionCheckpoint, records: list[DeadLetteredMessage], skip: bool
) -> bool:
    """Return whether the operation resumes the order: it handles the park message."""
    parked = checkpoint.parked
    if parked is None:
        return False
    if skip:
        return True
    return any(record.sequence_number == parked.sequence_number for record in records)


async def _finish(
    receiver: ServiceBusReceiver,
    locked: Locked,
    state: SessionState,
    records: list[DeadLetteredMessage],
) -> None:
    order_id = str(receiver.session.session_id)
    try:
        await receiver.session.set_state(state.encode())
    except ServiceBusError as error:
        # NOTE: the copies and the other active messages are already deferred, and
        # only this state lists them. Without it they stay until fetched by number.
        numbers = list(state.checkpoint.deferred_sequence_numbers)
        raise failed(
            f"writing the session state of order {order_id} (deferred messages "
            f"{numbers} are not recorded; the dead-lettered originals were kept)",
            error,
        ) from None
    try:
        for record in records:
            await locked.complete(record.sequence_number)
    except ServiceBusError as error:
        raise failed(
            f"completing the resubmitted originals of order {order_id} in the "
            "dead-letter queue (the copies are in place; remove the originals with "
            "`dlq purge --order`)",
            error,
        ) from None


def _resume_message(order_id: str, operation: str) -> ServiceBusMessage:
    """Build the message that makes a consumer accept the session again.

    Service Bus offers a session to consumers only while it has an active message,
    and everything else in the session is deferred once the tool is done.
    """
    body = json.dumps({"resumeSession": order_id}).encode("utf-8")
    return ServiceBusMessage(
        body,
        session_id=order_id,
        message_id=f"resume-{operation}",
        subject=RESUME_SUBJECT,
        content_type="application/json",
        application_properties={
            CONTROL_PROPERTY: RESUME_SESSION,
            OPERATION_PROPERTY: operation,
        },
    )


async def _send(
    client: ServiceBusClient, settings: Settings, messages: list[ServiceBusMessage]
) -> None:
    if not messages:
        return
    # One call sends one batch, so the resume message and the copies get consecutive
    # sequence numbers in this order.
    async with client.get_queue_sender(settings.entity_name) as sender:
        await sender.send_messages(messages)


async def _defer_through_copies(
    receiver: ServiceBusReceiver, operation: str, copies: int
) -> list[ServiceBusReceivedMessage]:
    """Defer the session's active messages up to the last of `copies` copies.

    The resume message is received too but left unsettled, so it returns to the
    session, still active, when the receiver closes.
    """
    deferred: list[ServiceBusReceivedMessage] = []
    seen = 0
    while seen < copies:
        batch = await receiver.receive_messages(
            max_message_count=PAGE_SIZE, max_wait_time=SESSION_WAIT_S
        )
        if not batch:
            raise DeadLetterToolError(
                f"{copies - seen} resubmitted copies did not arrive in session "
                f"{receiver.session.session_id} within {SESSION_WAIT_S}s"
            )
        for message in batch:
            properties = text_keys(message.application_properties or {})
            if properties.get(CONTROL_PROPERTY) == RESUME_SESSION:
                continue
            if properties.get(OPERATION_PROPERTY) == operation:
                seen += 1
            await receiver.defer_message(message)
            deferred.append(message)
    return deferred


async def _deferred_order(
    receiver: ServiceBusReceiver,
    checkpoint: SessionCheckpoint,
    newly_deferred: list[ServiceBusReceivedMessage],
) -> list[int]:
    """Return every deferred sequence number of the session in original order."""
    keys = await _original_numbers(receiver, checkpoint.deferred_sequence_numbers)
    for message in newly_deferred:
        number = int(message.sequence_number or 0)
        keys[number] = original_sequence_number(message)
    return sorted(keys, key=lambda number: (keys[number], number))


async def _original_numbers(
    receiver: ServiceBusReceiver, numbers: Iterable[int]
) -> dict[int, int]:
    """Return the original sequence number of each deferred message in `numbers`.

    Peeking returns deferred messages too, so one pass from the lowest number reads
    the properties of copies that earlier resubmits left deferred.
    """
    remaining = set(numbers)
    keys = {number: number for number in remaining}
    next_number = min(remaining, default=0)
    while remaining:
        page = await receiver.peek_messages(
            max_message_count=PAGE_SIZE, sequence_number=next_number
        )
        if not page:
            break
        for message in page:
            number = int(message.sequence_number or 0)
            if number in remaining:
                keys[number] = original_sequence_number(message)
                remaining.discard(number)
        next_number = max(int(m.sequence_number or 0) for m in page) + 1
    return keys
