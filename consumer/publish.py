"""Publishing order events to Service Bus with the properties the consumer relies on.

Each message gets session id = `payload.orderId` (so one order's events are handled in
sequence), subject = `eventType`, correlation id = `metadata.correlationId`, content
type `application/json`, a message id (by default a hash of the event, so publishing
the same event twice gives the same id) and optionally a W3C `traceparent` application
property. Messages go out in size-limited batches in input order, which keeps every
order's events in sequence. Transient send errors are retried with capped exponential
backoff.

A batch may mix sessions unless `one_session_per_batch` is set. Partitioned entities
need that option, because Service Bus uses the session id as partition key and cannot
take one batch for several partitions.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSender
from azure.servicebus.aio import ServiceBusClient as AsyncServiceBusClient
from azure.servicebus.aio import ServiceBusSender as AsyncServiceBusSender
from azure.servicebus.exceptions import (
    MessageSizeExceededError,
    OperationTimeoutError,
    ServiceBusCommunicationError,
    ServiceBusConnectionError,
    ServiceBusError,
    ServiceBusServerBusyError,
)

from consumer.config import Settings
from consumer.errors import ConsumerError, TransportError
from consumer.events import Event, event_to_json
from consumer.redact import redact
from consumer.tracing import inject_traceparent

CONTENT_TYPE = "application/json"

# Errors worth another attempt. azure-servicebus 7.15.0 marks errors retryable only in
# the private `_retryable` attribute, so the classes are listed instead. It also marks
# authentication errors retryable, which are left out because a retry cannot fix a key.
TRANSIENT_ERRORS: tuple[type[ServiceBusError], ...] = (
    ServiceBusConnectionError,
    ServiceBusCommunicationError,
    OperationTimeoutError,
    ServiceBusServerBusyError,
)

# The SDK's own retries are turned off on the clients opened here. SendRetryPolicy is
# then the only retry layer, so a failing send costs `attempts` tries, not that many
# times the SDK's retries.
_SDK_CLIENT_OPTIONS: dict[str, Any] = {"retry_total": 0}

# Service Bus limits the session id, which is `payload.orderId`, to 128 characters, and
# azure-servicebus 7.15.0 raises ValueError for a longer one.
MAX_SESSION_ID_CHARS = 128

_log = structlog.get_logger("orders_consumer.publish")


class InvalidEventError(ConsumerError, ValueError):
    """An event that cannot be published, such as one without `payload.orderId`."""


@dataclass(frozen=True)
class SendRetryPolicy:
    """Attempts per batch send and the capped exponential wait between them."""

    attempts: int = 5
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0

    def delay_s(self, attempt: int) -> float:
        """Return the wait after failed attempt number `attempt` (1-based)."""
        return min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)


@dataclass(frozen=True)
class PublishResult:
    """Counts of one publish call: messages and batches sent, send attempts retried."""

    messages: int
    batches: int
    retries: int


def message_id_for(event: Mapping[str, Any] | Event[Any]) -> str:
    """Return a message id derived from the event's content.

    The id is the first 32 hex digits of the SHA-256 of the event as JSON with sorted
    keys. A resent event keeps its id, so an entity with duplicate detection drops it.
    """
    data = json.loads(event_to_json(event)) if isinstance(event, Event) else event
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


def _required_text(data: Mapping[str, Any], path: str, purpose: str) -> str:
    value = data.get(path.rpartition(".")[2])
    if not isinstance(value, str) or not value:
        raise InvalidEventError(
            f"{path} is missing or not a non-empty string, but every event needs it "
            f"as the message's {purpose}"
        )
    return value


def build_message(
    event: Mapping[str, Any] | Event[Any],
    *,
    message_id: str | None = None,
    traceparent: str | None = None,
) -> ServiceBusMessage:
    """Build the Service Bus message of one event (a dict as in JSON, or an `Event`).

    Raises `InvalidEventError` when `eventType` or `payload.orderId` is missing, when
    `payload.orderId` is longer than a session id may be, and when the event contains
    NaN or an infinite number, which JSON cannot represent.
    """
    if isinstance(event, Event):
        data: Mapping[str, Any] = json.loads(event_to_json(event))
    elif isinstance(event, Mapping):
        data = event
    else:
        raise InvalidEventError(
            f"an event must be a JSON object, got {type(event).__name__}"
        )
    payload = data.get("payload")
    if not isinstance(payload, Mapping):
        raise InvalidEventError("payload is missing or not a JSON object")
    order_id = _required_text(payload, "payload.orderId", "session id")
    if len(order_id) > MAX_SESSION_ID_CHARS:
        raise InvalidEventError(
            f"payload.orderId is {len(order_id)} characters long, but it becomes the "
            f"session id, which is limited to {MAX_SESSION_ID_CHARS} characters"
        )
    event_type = _required_text(data, "eventType", "subject")
    metadata = data.get("metadata")
    correlation_id = (
        metadata.get("correlationId") if isinstance(metadata, Mapping) else None
    )

    # An explicit traceparent wins; otherwise the active OpenTelemetry span, if any,
    # is continued so the consumer's span joins the producer's trace.
    trace_properties = (
        {"traceparent": traceparent} if traceparent else inject_traceparent()
    )
    try:
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    except ValueError:
        # json.dumps would write them as NaN or Infinity, which the consumer rejects.
        raise InvalidEventError(
            "the event contains NaN or an infinite number, which JSON cannot represent"
        ) from None
    try:
        return ServiceBusMessage(
            text.encode("utf-8"),
            session_id=order_id,
            message_id=message_id or message_id_for(data),
            subject=event_type,
            correlation_id=correlation_id if isinstance(correlation_id, str) else None,
            content_type=CONTENT_TYPE,
            application_properties=trace_properties or None,
        )
    except ValueError as error:
        # The SDK checks more limits, such as the length of a given message id.
        raise InvalidEventError(str(error)) from None


def build_messages(
    events: Iterable[Mapping[str, Any] | Event[Any]], *, traceparent: str | None = None
) -> list[ServiceBusMessage]:
    """Build every event's message before anything is sent; errors name the index."""
    messages = []
    for index, event in enumerate(events):
        try:
            messages.append(build_message(event, traceparent=traceparent))
        except InvalidEventError as error:
            raise InvalidEventError(f"event {index}: {error}") from None
    return messages


def build_raw_message(
    body: bytes | str,
    session_id: str,
    *,
    message_id: str | None = None,
    subject: str | None = None,
    content_type: str | None = CONTENT_TYPE,
) -> ServiceBusMessage:
    """Build a message with any body and an explicit session id, unchecked.

    Meant for tests and tools that send bodies the consumer must reject. The default
    message id is a hash of the session id and the body.
    """
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    if message_id is None:
        digest = hashlib.sha256(session_id.encode("utf-8") + b"\0" + raw)
        message_id = digest.hexdigest()[:32]
    return ServiceBusMessage(
        raw,
        session_id=session_id,
        message_id=message_id,
        subject=subject,
        content_type=content_type,
    )


class _Batcher:
    """Counts and retry decisions shared by the sync and async senders."""

    def __init__(self, retry: SendRetryPolicy, one_session_per_batch: bool) -> None:
        self.retry = retry
        self.one_session_per_batch = one_session_per_batch
        self.batch_session: str | None = None
        self.messages = 0
        self.batches = 0
        self.retries = 0

    def try_add(self, batch: Any, message: ServiceBusMessage) -> bool:
        """Add `message` to `batch`, or return False when it needs a new batch.

        Raises `InvalidEventError` when the message does not fit even an empty batch.
        """
        other_session = message.session_id != self.batch_session
        if self.one_session_per_batch and len(batch) and other_session:
            return False
        try:
            batch.add_message(message)
        except MessageSizeExceededError as error:
            if len(batch) == 0:
                raise _too_large(message, error) from None
            return False
        self.batch_session = message.session_id
        return True

    def should_retry(self, attempt: int, error: ServiceBusError) -> float | None:
        """Return the wait before another attempt, or None to give up."""
        if not isinstance(error, TRANSIENT_ERRORS) or attempt >= self.retry.attempts:
            return None
        delay_s = self.retry.delay_s(attempt)
        self.retries += 1
        _log.warning(
            "batch_send_retried",
            attempt=attempt,
            delay_s=delay_s,
            error_type=type(error).__name__,
            error=redact(str(error)),
        )
        return delay_s

    def result(self) -> PublishResult:
        return PublishResult(self.messages, self.batches, self.retries)


def _too_large(
    message: ServiceBusMessage, error: MessageSizeExceededError
) -> Exception:
    return InvalidEventError(
        f"message {message.message_id} (session {message.session_id}) does not fit "
        f"in an empty batch: {error}"
    )


def send_batched(
    sender: ServiceBusSender,
    messages: Sequence[ServiceBusMessage],
    *,
    max_batch_bytes: int | None = None,
    retry: SendRetryPolicy | None = None,
    one_session_per_batch: bool = False,
) -> PublishResult:
    """Send `messages` in order, in batches of at most `max_batch_bytes`.

    The default limit is the sender link's maximum message size. A new batch starts
    when the next message does not fit, or has another session id and
    `one_session_per_batch` is set. A message too large for an empty batch raises
    `InvalidEventError` before any batch is sent. Transient errors are retried per
    batch, and any other `ServiceBusError` propagates.
    """
    batcher = _Batcher(retry or SendRetryPolicy(), one_session_per_batch)
    # Every batch is filled before the first send, so a message that fits no batch
    # raises before anything of the input is on the queue.
    batches = [sender.create_message_batch(max_batch_bytes)]
    for message in messages:
        if not batcher.try_add(batches[-1], message):
            batches.append(sender.create_message_batch(max_batch_bytes))
            batcher.try_add(batches[-1], message)
    for batch in batches:
        if len(batch):
            _send_sync(sender, batch, batcher)
    return batcher.result()


def _send_sync(sender: ServiceBusSender, batch: Any, batcher: _Batcher) -> None:
    attempt = 1
    while True:
        try:
            sender.send_messages(batch)
        except ServiceBusError as error:
            delay_s = batcher.should_retry(attempt, error)
            if delay_s is None:
                raise
            time.sleep(delay_s)
            attempt += 1
            continue
        batcher.messages += len(batch)
        batcher.batches += 1
        return


async def send_batched_async(
    sender: AsyncServiceBusSender,
    messages: Sequence[ServiceBusMessage],
    *,
    max_batch_bytes: int | None = None,
    retry: SendRetryPolicy | None = None,
    one_session_per_batch: bool = False,
) -> PublishResult:
    """Send `messages` like `send_batched`, on an `azure.servicebus.aio` sender."""
    batcher = _Batcher(retry or SendRetryPolicy(), one_session_per_batch)
    batches = [await sender.create_message_batch(max_batch_bytes)]
    for message in messages:
        if not batcher.try_add(batches[-1], message):
            batches.append(await sender.create_message_batch(max_batch_bytes))
            batcher.try_add(batches[-1], message)
    for batch in batches:
        if len(batch):
            await _send_async(sender, batch, batcher)
    return batcher.result()


async def _send_async(
    sender: AsyncServiceBusSender, batch: Any, batcher: _Batcher
) -> None:
    attempt = 1
    while True:
        try:
            await sender.send_messages(batch)
        except ServiceBusError as error:
            delay_s = batcher.should_retry(attempt, error)
            if delay_s is None:
                raise
            await asyncio.sleep(delay_s)
            attempt += 1
            continue
        batcher.messages += len(batch)
        batcher.batches += 1
        return


def _connection_failed(settings: Settings, error: Exception) -> TransportError:
    return TransportError(
        f"publishing to {settings.entity_name} failed: {redact(str(error))}"
    )


@contextmanager
def _open_sender(settings: Settings) -> Iterator[ServiceBusSender]:
    """Open a client and a sender: the topic if a subscription is set, else queue."""
    credential: Any = None
    if settings.connection_string is not None:
        secret = settings.connection_string.get_secret_value()
        client = ServiceBusClient.from_connection_string(secret, **_SDK_CLIENT_OPTIONS)
    else:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
        namespace = str(settings.fully_qualified_namespace)
        client = ServiceBusClient(
            namespace, credential=credential, **_SDK_CLIENT_OPTIONS
        )
    try:
        with client:
            if settings.subscription:
                sender = client.get_topic_sender(topic_name=settings.entity_name)
            else:
                sender = client.get_queue_sender(queue_name=settings.entity_name)
            with sender:
                yield sender
    finally:
        if credential is not None:
            credential.close()


@asynccontextmanager
async def _open_sender_async(
    settings: Settings,
) -> AsyncIterator[AsyncServiceBusSender]:
    """Open an `aio` client and sender like `_open_sender`."""
    credential: Any = None
    if settings.connection_string is not None:
        secret = settings.connection_string.get_secret_value()
        client = AsyncServiceBusClient.from_connection_string(
            secret, **_SDK_CLIENT_OPTIONS
        )
    else:
        from azure.identity.aio import DefaultAzureCredential

        credential = DefaultAzureCredential()
        namespace = str(settings.fully_qualified_namespace)
        client = AsyncServiceBusClient(
            namespace, credential=credential, **_SDK_CLIENT_OPTIONS
        )
    try:
        async with client:
            if settings.subscription:
                sender = client.get_topic_sender(topic_name=settings.entity_name)
            else:
                sender = client.get_queue_sender(queue_name=settings.entity_name)
            async with sender:
                yield sender
    finally:
        if credential is not None:
            await credential.close()


def publish_messages_sync(
    settings: Settings,
    messages: Sequence[ServiceBusMessage],
    *,
    max_batch_bytes: int | None = None,
    retry: SendRetryPolicy | None = None,
    one_session_per_batch: bool = False,
) -> PublishResult:
    """Send `messages` to the entity of `settings` on a new client, then close it.

    Raises `TransportError`, with secrets removed, when the broker cannot be reached or
    a send fails after its retries.
    """
    try:
        with _open_sender(settings) as sender:
            return send_batched(
                sender,
                messages,
                max_batch_bytes=max_batch_bytes,
                retry=retry,
                one_session_per_batch=one_session_per_batch,
            )
    except (ServiceBusError, ValueError) as error:
        if isinstance(error, InvalidEventError):
            raise
        raise _connection_failed(settings, error) from None


async def publish_messages(
    settings: Settings,
    messages: Sequence[ServiceBusMessage],
    *,
    max_batch_bytes: int | None = None,
    retry: SendRetryPolicy | None = None,
    one_session_per_batch: bool = False,
) -> PublishResult:
    """Send `messages` like `publish_messages_sync`, on an `aio` client."""
    try:
        async with _open_sender_async(settings) as sender:
            return await send_batched_async(
                sender,
                messages,
                max_batch_bytes=max_batch_bytes,
                retry=retry,
                one_session_per_batch=one_session_per_batch,
            )
    except (ServiceBusError, ValueError) as error:
        if isinstance(error, InvalidEventError):
            raise
        raise _connection_failed(settings, error) from None


def publish_events_sync(
    settings: Settings,
    events: Iterable[Mapping[str, Any] | Event[Any]],
    *,
    traceparent: str | None = None,
    retry: SendRetryPolicy | None = None,
) -> int:
    """Publish events to the entity of `settings`; return how many were sent.

    Every event is checked before the first send, so bad input sends nothing.
    """
    messages = build_messages(events, traceparent=traceparent)
    return publish_messages_sync(settings, messages, retry=retry).messages


async def publish_events(
    settings: Settings,
    events: Iterable[Mapping[str, Any] | Event[Any]],
    *,
    traceparent: str | None = None,
    retry: SendRetryPolicy | None = None,
) -> int:
    """Publish events like `publish_events_sync`, on an `aio` client."""
    messages = build_messages(events, traceparent=traceparent)
    result = await publish_messages(settings, messages, retry=retry)
    return result.messages


async def publish_raw(
    settings: Settings,
    bodies: Iterable[tuple[str, bytes | str]],
    *,
    retry: SendRetryPolicy | None = None,
) -> int:
    """Publish `(session_id, body)` pairs as they are, for example invalid bodies."""
    messages = [build_raw_message(body, session_id) for session_id, body in bodies]
    result = await publish_messages(settings, messages, retry=retry)
    return result.messages


def publish_raw_sync(
    settings: Settings,
    bodies: Iterable[tuple[str, bytes | str]],
    *,
    retry: SendRetryPolicy | None = None,
) -> int:
    """Publish `(session_id, body)` pairs like `publish_raw`, synchronously."""
    messages = [build_raw_message(body, session_id) for session_id, body in bodies]
    return publish_messages_sync(settings, messages, retry=retry).messages
