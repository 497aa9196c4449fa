"""Reading and settling the dead-letter queue of the consumed entity.

`DeadLetterQueue` peeks dead-lettered messages (peek never locks, so listing does not
disturb anything), locks selected ones to complete them, and purges. Service Bus keeps
a message's sequence number, session id and properties when it dead-letters it. It
stores the reason and description in the application properties `DeadLetterReason`
and `DeadLetterErrorDescription`. So every record here names its order and its place
in that order.

Resubmitting into an order's session is in `consumer.sessions_admin`, because it has
to respect the order's session state.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from azure.servicebus import (
    ServiceBusMessage,
    ServiceBusReceivedMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver
from azure.servicebus.amqp import AmqpMessageBodyType
from azure.servicebus.exceptions import ServiceBusError

from consumer.config import Settings
from consumer.errors import ConfigurationError, ConsumerError
from consumer.events import EventRejected, decode_body
from consumer.redact import redact
from consumer.terminal import LINE_BREAKS, escape_controls

REASON_PROPERTY = "DeadLetterReason"
DESCRIPTION_PROPERTY = "DeadLetterErrorDescription"
# Set on a resubmitted copy: the sequence number of the dead-lettered message it was
# made from, and the sequence number of the first message in that chain of copies.
RESUBMITTED_FROM_PROPERTY = "orders-consumer-resubmitted-from"
ORIGINAL_SEQUENCE_PROPERTY = "orders-consumer-original-sequence-number"
# Messages per peek or receive call. Service Bus returns at most this many anyway
# when prefetch is off, and the value keeps one round trip small.
PAGE_SIZE = 100
# How long one receive waits for more messages before the queue counts as drained.
RECEIVE_WAIT_S = 2.0
# `dlq show` prints at most this much of a body.
MAX_SHOWN_BODY_CHARS = 16 * 1024

Progress = Callable[[int], None]


class DeadLetterToolError(ConsumerError):
    """A tool operation failed; the message names the cause and the next step."""


@dataclass(frozen=True)
class DeadLetteredMessage:
    """One message in the dead-letter queue, with what the tools show and resend."""

    sequence_number: int
    order_id: str
    message_id: str
    event_type: str
    reason: str
    description: str
    enqueued_at: datetime | None
    delivery_count: int
    correlation_id: str | None
    content_type: str | None
    application_properties: Mapping[str, Any] = field(default_factory=dict)
    body: bytes | None = None

    @property
    def original_sequence_number(self) -> int:
        """Sequence number of the first message this one is a resubmitted copy of.

        A message that was never resubmitted is its own original. The ordering of an
        order's messages follows this number, not the copy's new one.
        """
        return _original_number(self.application_properties, self.sequence_number)

    @classmethod
    def from_sdk(cls, message: ServiceBusReceivedMessage) -> DeadLetteredMessage:
        """Read the fields of a peeked or received dead-lettered message."""
        properties = text_keys(message.application_properties or {})
        return cls(
            sequence_number=int(message.sequence_number or 0),
            order_id=str(message.session_id or ""),
            message_id=str(message.message_id or ""),
            event_type=str(message.subject or ""),
            reason=str(message.dead_letter_reason or ""),
            description=str(message.dead_letter_error_description or ""),
            enqueued_at=message.enqueued_time_utc,
            delivery_count=int(message.delivery_count or 0),
            correlation_id=message.correlation_id,
            content_type=message.content_type,
            application_properties=properties,
            body=message_body(message),
        )

    def resubmit_copy(self, extra_properties: Mapping[str, Any]) -> ServiceBusMessage:
        """Build the copy that a resubmit sends into the message's own session.

        The copy keeps the body, message id, subject, correlation id, content type
        and application properties, and names the dead-lettered original in
        `orders-consumer-resubmitted-from` and `orders-consumer-original-sequence-
        number`. Raises `DeadLetterToolError` for a message without a data body.
        """
        if self.body is None:
            raise DeadLetterToolError(
                f"message {self.sequence_number} of order {self.order_id} has no data "
                "body (an AMQP value or sequence), so it cannot be resubmitted; "
                "remove it with `dlq purge`"
            )
        properties = self.user_properties()
        properties[RESUBMITTED_FROM_PROPERTY] = self.sequence_number
        properties[ORIGINAL_SEQUENCE_PROPERTY] = self.original_sequence_number
        properties.update(extra_properties)
        return ServiceBusMessage(
            self.body,
            session_id=self.order_id,
            message_id=self.message_id or None,
            subject=self.event_type or None,
            correlation_id=self.correlation_id,
            content_type=self.content_type,
            application_properties=properties,
        )

    def user_properties(self) -> dict[str, Any]:
        """Return the application properties without the dead-letter reason fields."""
        return {
            key: value
            for key, value in self.application_properties.items()
            if key not in (REASON_PROPERTY, DESCRIPTION_PROPERTY)
        }


def text_keys(properties: Mapping[Any, Any]) -> dict[str, Any]:
    """Return `properties` with bytes keys and values decoded as UTF-8 text.

    azure-servicebus 7.15.0 returns the application properties of a received message
    with `bytes` keys and string values as `bytes`.
    """
    decoded: dict[str, Any] = {}
    for key, value in properties.items():
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        decoded[name] = value
    return decoded


def original_sequence_number(message: ServiceBusReceivedMessage) -> int:
    """Return the sequence number of the message that `message` is a copy of.

    A message that is not a resubmitted copy is its own original.
    """
    properties = text_keys(message.application_properties or {})
    return _original_number(properties, int(message.sequence_number or 0))


def _original_number(properties: Mapping[str, Any], own_number: int) -> int:
    original = copied_from(properties.get(ORIGINAL_SEQUENCE_PROPERTY), own_number)
    return own_number if original is None else original


def copied_from(value: Any, own_number: int) -> int | None:
    """Return the original sequence number that a copy's property `value` names.

    A copy is always enqueued after its original. A value that is not a positive
    number below the message's own sequence number was not written by these tools, so
    it gives None: a producer that sets the property cannot reorder or reject an
    order's events.
    """
    if value is None or isinstance(value, bool):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if 0 < number < own_number else None


def message_body(message: ServiceBusReceivedMessage) -> bytes | None:
    """Return the data sections of `message` joined, or None for other body types."""
    if message.body_type != AmqpMessageBodyType.DATA:
        return None
    return b"".join(bytes(section) for section in message.body)


def render_body(body: bytes | None, limit: int = MAX_SHOWN_BODY_CHARS) -> str:
    """Return `body` for printing to a terminal, cut at `limit` characters.

    A body that `decode_body` accepts (a JSON object within its size and depth limits)
    is shown as indented JSON. Any other body is shown as its raw text, after a line
    that gives the reason. Bytes that are not UTF-8 are shown as `\\xNN` escapes and
    control characters as escapes such as `\\x1b`, so the text cannot drive the
    terminal.
    """
    if body is None:
        return "(no data body: the message carries an AMQP value or sequence)"
    try:
        value = decode_body(body)
    except EventRejected as rejected:
        return _render_raw(body, rejected.description, limit)
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return _cut(text, limit, len(body))


def _render_raw(body: bytes, problem: str, limit: int) -> str:
    notes = [f"not shown as JSON: {problem}"]
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        notes.append("bytes that are not UTF-8 are shown as \\xNN escapes")
    # The shown text is built from a prefix, not from a copy of the whole body. A
    # character takes at most 4 bytes, so the prefix contains more than `limit`
    # characters whenever the body is longer than the prefix, and `_cut` notes the cut.
    text = body[: 4 * (limit + 1)].decode("utf-8", "backslashreplace")
    note = escape_controls("; ".join(notes))
    return f"({note})\n{_cut(text, limit, len(body))}"


def _cut(text: str, limit: int, body_bytes: int) -> str:
    head = escape_controls(text[:limit], keep=LINE_BREAKS)
    if len(text) <= limit:
        return head
    return f"{head}\n... (cut at {limit} characters; the body is {body_bytes} bytes)"


@asynccontextmanager
async def open_client(settings: Settings) -> AsyncIterator[ServiceBusClient]:
    """Open an `aio` client for the broker of `settings` and close it on exit.

    Uses the connection string when set, else `DefaultAzureCredential` on the fully
    qualified namespace. Raises `ConfigurationError`, with secrets removed, for a
    malformed connection string.
    """
    credential: Any = None
    try:
        if settings.connection_string is not None:
            secret = settings.connection_string.get_secret_value()
            client = ServiceBusClient.from_connection_string(secret)
        else:
            from azure.identity.aio import DefaultAzureCredential

            credential = DefaultAzureCredential()
            namespace = str(settings.fully_qualified_namespace)
            client = ServiceBusClient(namespace, credential=credential)
    except ValueError as error:
        raise ConfigurationError(
            "invalid connection_string (env var ORDERS_CONSUMER_CONNECTION_STRING): "
            f"{redact(str(error))}"
        ) from None
    try:
        async with client:
            yield client
    finally:
        if credential is not None:
            await credential.close()


def entity_receiver(
    client: ServiceBusClient, settings: Settings, **options: Any
) -> ServiceBusReceiver:
    """Return a receiver on the entity of `settings`: its queue or its subscription."""
    if settings.subscription:
        return client.get_subscription_receiver(
            topic_name=settings.entity_name,
            subscription_name=settings.subscription,
            **options,
        )
    return client.get_queue_receiver(queue_name=settings.entity_name, **options)


def failed(action: str, error: BaseException) -> DeadLetterToolError:
    """Return the tool error for a failed broker `action`, with secrets removed."""
    return DeadLetterToolError(f"{action} failed: {redact(str(error))}")


@dataclass(frozen=True)
class Selection:
    """The filter of an operation on dead-lettered messages; empty fields match all."""

    reason: str | None = None
    order_id: str | None = None
    sequence_numbers: frozenset[int] = frozenset()

    def matches(self, message: DeadLetteredMessage) -> bool:
        """Return whether `message` passes every set filter."""
        if self.reason is not None and message.reason != self.reason:
            return False
        if self.order_id is not None and message.order_id != self.order_id:
            return False
        if (
            self.sequence_numbers
            and message.sequence_number not in self.sequence_numbers
        ):
            return False
        return True

    @property
    def is_everything(self) -> bool:
        """Whether no filter is set."""
        return (
            self.reason is None and self.order_id is None and not self.sequence_numbers
        )


class DeadLetterQueue:
    """The dead-letter queue of the entity of `settings`, on an open client."""

    def __init__(self, client: ServiceBusClient, settings: Settings) -> None:
        self._client = client
        self._settings = settings

    @property
    def name(self) -> str:
        """Address of the dead-letter queue, for messages to the operator."""
        entity = self._settings.entity_name
        if self._settings.subscription:
            entity = f"{entity}/subscriptions/{self._settings.subscription}"
        return f"{entity}/$DeadLetterQueue"

    def _receiver(self, **options: Any) -> ServiceBusReceiver:
        return entity_receiver(
            self._client,
            self._settings,
            sub_queue=ServiceBusSubQueue.DEAD_LETTER,
            max_wait_time=RECEIVE_WAIT_S,
            **options,
        )

    async def peek(
        self, selection: Selection | None = None
    ) -> list[DeadLetteredMessage]:
        """Return the dead-lettered messages that match `selection`, oldest first.

        Peeking reads without locking, so consumers and other tools are not affected.
        Messages that arrive during the scan may or may not be included.
        """
        selection = selection or Selection()
        found: list[DeadLetteredMessage] = []
        try:
            async with self._receiver() as receiver:
                async for message in _peek_all(receiver):
                    record = DeadLetteredMessage.from_sdk(message)
                    if selection.matches(record):
                        found.append(record)
        except ServiceBusError as error:
            raise failed(f"reading {self.name}", error) from None
        return found

    async def find(self, sequence_number: int) -> DeadLetteredMessage | None:
        """Return the dead-lettered message with `sequence_number`, or None."""
        try:
            async with self._receiver() as receiver:
                peeked = await receiver.peek_messages(
                    max_message_count=1, sequence_number=sequence_number
                )
        except ServiceBusError as error:
            raise failed(f"reading {self.name}", error) from None
        for message in peeked:
            if message.sequence_number == sequence_number:
                return DeadLetteredMessage.from_sdk(message)
        return None

    @asynccontextmanager
    async def locked(
        self, sequence_numbers: Iterable[int], *, require_all: bool = True
    ) -> AsyncIterator[Locked]:
        """Lock the dead-lettered messages with `sequence_numbers` for settlement.

        The dead-letter queue has no sessions and no receive by sequence number, so
        this receives messages in order until it has locked all of them. Messages locked
        on the way are abandoned on exit, which adds one to their delivery count.
        Raises `DeadLetterToolError` naming the numbers that are no longer there,
        unless `require_all` is False.
        """
        requested = set(sequence_numbers)
        receiver = self._receiver(receive_mode=ServiceBusReceiveMode.PEEK_LOCK)
        try:
            await receiver.__aenter__()
            locked_messages, others = await _receive_until(receiver, requested)
        except ServiceBusError as error:
            await receiver.close()
            raise failed(f"locking messages in {self.name}", error) from None
        try:
            missing = sorted(requested - set(locked_messages))
            if missing and require_all:
                raise DeadLetterToolError(
                    f"dead-lettered messages {missing} are no longer in "
                    f"{self.name}; list the queue again and retry"
                )
            yield Locked(receiver, locked_messages)
        finally:
            with contextlib.suppress(ServiceBusError):
                # A failed abandon only delays the message until its lock expires.
                for message in others:
                    await receiver.abandon_message(message)
            await receiver.close()

    async def purge(
        self,
        selection: Selection,
        progress: Progress | None = None,
        limit: int | None = None,
    ) -> int:
        """Remove the matching messages and return how many were removed.

        Without filters, messages are received in receive-and-delete mode. With
        filters, matching messages are completed and the others abandoned. With
        `limit`, at most that many are removed, for example the count an operator
        confirmed, so messages dead-lettered during the purge stay.
        """
        try:
            if selection.is_everything:
                return await self._delete_all(progress, limit)
            return await self._complete_matching(selection, progress, limit)
        except ServiceBusError as error:
            raise failed(f"purging {self.name}", error) from None

    async def _delete_all(self, progress: Progress | None, limit: int | None) -> int:
        removed = 0
        mode = ServiceBusReceiveMode.RECEIVE_AND_DELETE
        async with self._receiver(receive_mode=mode) as receiver:
            while limit is None or removed < limit:
                count = PAGE_SIZE if limit is None else min(PAGE_SIZE, limit - removed)
                batch = await receiver.receive_messages(
                    max_message_count=count, max_wait_time=RECEIVE_WAIT_S
                )
                if not batch:
                    break
                removed += len(batch)
                if progress is not None:
                    progress(len(batch))
        return removed

    async def _complete_matching(
        self, selection: Selection, progress: Progress | None, limit: int | None
    ) -> int:
        removed = 0
        others: list[ServiceBusReceivedMessage] = []
        async with self._receiver() as receiver:
            try:
                while limit is None or removed < limit:
                    batch = await receiver.receive_messages(
                        max_message_count=PAGE_SIZE, max_wait_time=RECEIVE_WAIT_S
                    )
                    if not batch:
                        break
                    for message in batch:
                        record = DeadLetteredMessage.from_sdk(message)
                        full = limit is not None and removed >= limit
                        if full or not selection.matches(record):
                            others.append(message)
                            continue
                        await receiver.complete_message(message)
                        removed += 1
                        if progress is not None:
                            progress(1)
            finally:
                # NOTE: the non-matching messages stay locked until the scan ends, so
                # a queue scanned for longer than the lock duration loses some locks
                # and returns those messages early. That is harmless: they stay.
                for message in others:
                    await receiver.abandon_message(message)
        return removed


class Locked:
    """Dead-lettered messages locked by `DeadLetterQueue.locked`, by sequence number."""

    def __init__(
        self,
        receiver: ServiceBusReceiver,
        locked_messages: dict[int, ServiceBusReceivedMessage],
    ) -> None:
        self._receiver = receiver
        self._messages = locked_messages

    def records(self) -> list[DeadLetteredMessage]:
        """Return the locked messages, oldest first."""
        return [
            DeadLetteredMessage.from_sdk(self._messages[n])
            for n in sorted(self._messages)
        ]

    async def complete(self, sequence_number: int) -> None:
        """Remove the locked message with `sequence_number` from the queue."""
        message = self._messages.pop(sequence_number)
        await self._receiver.complete_message(message)


async def _peek_all(
    receiver: ServiceBusReceiver,
) -> AsyncIterator[ServiceBusReceivedMessage]:
    next_number = 0
    while True:
        page = await receiver.peek_messages(
            max_message_count=PAGE_SIZE, sequence_number=next_number
        )
        if not page:
            return
        for message in page:
            yield message
        next_number = max(int(m.sequence_number or 0) for m in page) + 1


async def _receive_until(
    receiver: ServiceBusReceiver, requested: set[int]
) -> tuple[dict[int, ServiceBusReceivedMessage], list[ServiceBusReceivedMessage]]:
    """Receive until every number in `requested` is locked or the queue runs dry."""
    locked_messages: dict[int, ServiceBusReceivedMessage] = {}
    others: list[ServiceBusReceivedMessage] = []
    while len(locked_messages) < len(requested):
        batch = await receiver.receive_messages(
            max_message_count=PAGE_SIZE, max_wait_time=RECEIVE_WAIT_S
        )
        if not batch:
            break
        for message in batch:
            number = int(message.sequence_number or 0)
            if number in requested:
                locked_messages[number] = message
            else:
                others.append(message)
    return locked_messages, others
