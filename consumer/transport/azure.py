"""The production transport on `azure.servicebus.aio`, one client per process.

SDK exceptions are translated at this edge: a lost session or message lock becomes
`SessionLockLost` and every other Service Bus failure `TransportError`, with secrets
removed from the message.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

import certifi
import structlog
from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusReceivedMessage
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver
from azure.servicebus.amqp import AmqpMessageBodyType
from azure.servicebus.exceptions import (
    MessageLockLostError,
    OperationTimeoutError,
    ServiceBusError,
    SessionCannotBeLockedError,
    SessionLockLostError,
)

from consumer.config import Settings
from consumer.dlq import ORIGINAL_SEQUENCE_PROPERTY, copied_from
from consumer.errors import SessionLockLost, TransportError
from consumer.logs import log_exception_text
from consumer.redact import redact
from consumer.transport import InboundMessage

T = TypeVar("T")
log = structlog.get_logger("orders_consumer.transport")

# Closing a receiver took about 0.5 s against the local broker. A close that takes far
# longer is given up, so a drain cannot hang on it.
CLOSE_TIMEOUT_S = 10.0
CLIENT_CLOSE_ATTEMPTS = 3


def _shared_tls_context() -> ssl.SSLContext:
    """Build one TLS context for every AMQP connection of the client.

    It trusts the certifi CA bundle and checks host names, like the default context of
    azure-servicebus 7.15.0. The SDK builds that default for each connection, even
    without TLS for the emulator, and it lives until a full garbage collection frees
    the closed connection's reference cycles. Each one took about 0.7 MB of OpenSSL
    3.0 memory, so RSS grew with every session opened.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(certifi.where())
    return context


def _message_body(message: ServiceBusReceivedMessage) -> bytes | None:
    if message.body_type != AmqpMessageBodyType.DATA:
        return None
    return b"".join(bytes(section) for section in message.body)


def _original_sequence_number(message: ServiceBusReceivedMessage) -> int | None:
    """Return the sequence number of the original of a copy the tools sent, or None."""
    # One pass over the properties, since this runs for every received message.
    for key, value in (message.application_properties or {}).items():
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        if name == ORIGINAL_SEQUENCE_PROPERTY:
            return copied_from(value, int(message.sequence_number or 0))
    return None


def _to_inbound(message: ServiceBusReceivedMessage, session_id: str) -> InboundMessage:
    return InboundMessage(
        body=_message_body(message),
        message_id=str(message.message_id or ""),
        session_id=message.session_id or session_id,
        sequence_number=int(message.sequence_number or 0),
        delivery_count=int(message.delivery_count or 0),
        enqueued_at=message.enqueued_time_utc,
        correlation_id=message.correlation_id,
        subject=message.subject,
        handle=message,
        original_sequence_number=_original_sequence_number(message),
        application_properties=message.application_properties,
    )


@asynccontextmanager
async def _translated_errors(action: str, session_id: str) -> AsyncIterator[None]:
    try:
        yield
    except (SessionLockLostError, MessageLockLostError) as error:
        raise SessionLockLost(
            f"{action} failed on session {session_id}: lock lost ({redact(str(error))})"
        ) from error
    except ValueError as error:
        # The SDK raises ValueError for an operation on a receiver it shut down after
        # a link or connection error. Its link is detached, so the session lock is gone.
        if "shutdown" in str(error):
            raise SessionLockLost(
                f"{action} failed on session {session_id}: receiver shut down"
            ) from error
        raise TransportError(
            f"{action} failed on session {session_id}: {redact(str(error))}"
        ) from error
    except ServiceBusError as error:
        raise TransportError(
            f"{action} failed on session {session_id}: {redact(str(error))}"
        ) from error


class AzureSessionReceiver:
    """A `SessionReceiver` over one SDK session receiver."""

    def __init__(self, receiver: ServiceBusReceiver) -> None:
        self._receiver = receiver
        self._session_id = str(receiver.session.session_id)
        # The lock renewer and the worker share one management link. Under load the
        # local broker closed connections of azure-servicebus 7.15.0 with "sequencing
        # error, expected delivery-id 6, got 5", and concurrent requests on that link
        # are the likely cause, so management requests go one at a time.
        self._management = asyncio.Lock()

    @property
    def session_id(self) -> str:
        """Id of the held session (the order id)."""
        return self._session_id

    @property
    def locked_until(self) -> datetime | None:
        """Expiry of the session lock as last reported by the broker."""
        return self._receiver.session.locked_until_utc

    async def _call(self, action: str, operation: Awaitable[T]) -> T:
        async with _translated_errors(action, self._session_id):
            return await operation

    async def _request(self, action: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Send one management request, after any other one on this receiver."""
        async with self._management:
            return await self._call(action, operation())

    async def receive(self, max_wait_s: float) -> InboundMessage | None:
        """Return the next message of the session, or None after `max_wait_s` idle."""
        messages = await self._call(
            "receive",
            self._receiver.receive_messages(
                max_message_count=1, max_wait_time=max_wait_s
            ),
        )
        if not messages:
            return None
        return _to_inbound(messages[0], self._session_id)

    async def peek_sequence_numbers(
        self, from_sequence_number: int, max_count: int
    ) -> list[int]:
        """Return the sequence numbers of up to `max_count` active or deferred
        messages from `from_sequence_number` on, without locking them."""
        peeked = await self._request(
            "peek",
            lambda: self._receiver.peek_messages(
                max_message_count=max_count, sequence_number=from_sequence_number
            ),
        )
        return [int(message.sequence_number or 0) for message in peeked]

    async def receive_deferred(
        self, sequence_numbers: list[int]
    ) -> list[InboundMessage]:
        """Return deferred messages of this session in `sequence_numbers` order."""
        if not sequence_numbers:
            return []
        messages = await self._request(
            "receive_deferred",
            lambda: self._receiver.receive_deferred_messages(sequence_numbers),
        )
        inbound = [_to_inbound(message, self._session_id) for message in messages]
        position = {number: index for index, number in enumerate(sequence_numbers)}
        return sorted(inbound, key=lambda item: position.get(item.sequence_number, 0))

    async def complete(self, message: InboundMessage) -> None:
        """Remove the message from the entity."""
        await self._call("complete", self._receiver.complete_message(message.handle))

    async def abandon(self, message: InboundMessage) -> None:
        """Release the lock so the message returns at the head of its session."""
        await self._call("abandon", self._receiver.abandon_message(message.handle))

    async def defer(self, message: InboundMessage) -> None:
        """Set the message aside; only `receive_deferred` can fetch it again."""
        await self._call("defer", self._receiver.defer_message(message.handle))

    async def dead_letter(
        self, message: InboundMessage, reason: str, description: str
    ) -> None:
        """Move the message to the dead-letter queue with `reason` and `description`."""
        await self._call(
            "dead_letter",
            self._receiver.dead_letter_message(
                message.handle, reason=reason, error_description=description
            ),
        )

    async def get_state(self) -> bytes | None:
        """Return the session state, or None when none was set."""
        state = await self._request("get_state", self._receiver.session.get_state)
        return bytes(state) if state else None

    async def set_state(self, state: bytes | None) -> None:
        """Replace the session state."""
        await self._request(
            "set_state", lambda: self._receiver.session.set_state(state)
        )

    async def renew_lock(self) -> datetime:
        """Extend the session lock and return its new expiry."""
        return await self._request("renew_lock", self._receiver.session.renew_lock)

    async def close(self) -> None:
        """Release the session; unsettled messages return to the broker in order.

        Raises `TransportError` when the SDK does not finish closing within
        `CLOSE_TIMEOUT_S`; the link is then abandoned to the SDK's own cleanup.
        """
        try:
            await asyncio.wait_for(
                self._call("close", self._receiver.close()), CLOSE_TIMEOUT_S
            )
        except TimeoutError:
            raise TransportError(
                f"closing session {self._session_id} timed out after {CLOSE_TIMEOUT_S}s"
            ) from None


class AzureTransport:
    """A `Transport` on one `ServiceBusClient`, for a queue or a topic subscription."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._credential: Any = None
        self._client = self._create_client(settings)
        self._closing: set[asyncio.Task[None]] = set()

    def _create_client(self, settings: Settings) -> ServiceBusClient:
        options: dict[str, Any] = {
            "retry_total": settings.transport_retry_attempts,
            "retry_backoff_factor": settings.transport_retry_backoff_s,
            "retry_backoff_max": settings.transport_retry_max_backoff_s,
            "ssl_context": _shared_tls_context(),
        }
        if settings.connection_string is not None:
            try:
                return ServiceBusClient.from_connection_string(
                    settings.connection_string.get_secret_value(), **options
                )
            except ValueError as error:
                raise TransportError(
                    f"invalid connection_string: {redact(str(error))}"
                ) from None
        # azure.identity is needed only without a connection string.
        from azure.identity.aio import DefaultAzureCredential

        self._credential = DefaultAzureCredential()
        namespace = str(settings.fully_qualified_namespace)
        return ServiceBusClient(namespace, credential=self._credential, **options)

    @property
    def entity(self) -> str:
        """Queue name, or `topic/subscriptions/name`, for logs and metric labels."""
        if self._settings.subscription:
            topic = self._settings.entity_name
            return f"{topic}/subscriptions/{self._settings.subscription}"
        return self._settings.entity_name

    def _session_receiver(self, max_wait_s: float) -> ServiceBusReceiver:
        options: dict[str, Any] = {
            "session_id": NEXT_AVAILABLE_SESSION,
            "max_wait_time": max_wait_s,
            "prefetch_count": self._settings.prefetch_count,
        }
        if self._settings.subscription:
            return self._client.get_subscription_receiver(
                topic_name=self._settings.entity_name,
                subscription_name=self._settings.subscription,
                **options,
            )
        return self._client.get_queue_receiver(
            queue_name=self._settings.entity_name, **options
        )

    async def accept_session(self, max_wait_s: float) -> AzureSessionReceiver | None:
        """Lock the next available session, or return None after `max_wait_s`."""
        receiver = self._session_receiver(max_wait_s)
        try:
            await receiver.__aenter__()
        except (OperationTimeoutError, SessionCannotBeLockedError):
            self._close_in_background(receiver)
            return None
        except (ServiceBusError, ValueError) as error:
            self._close_in_background(receiver)
            raise TransportError(
                f"accepting a session on {self.entity} failed: {redact(str(error))}"
            ) from error
        except asyncio.CancelledError:
            # Cancelled mid-accept: the link may already hold a session lock.
            self._close_in_background(receiver)
            raise
        if not isinstance(receiver.session.session_id, str):
            # Service Bus replies to a next-available attach that timed out with an
            # attach carrying no session, then a detach. The SDK can report the link
            # open in between, so a receiver without a session id granted nothing.
            self._close_in_background(receiver)
            return None
        return AzureSessionReceiver(receiver)

    def _close_in_background(self, receiver: ServiceBusReceiver) -> None:
        task = asyncio.ensure_future(
            asyncio.wait_for(receiver.close(), CLOSE_TIMEOUT_S)
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close the client and, when one was created, the Azure AD credential.

        The closes of refused, timed-out or cancelled accepts, which run in the
        background, get up to `CLOSE_TIMEOUT_S` to end first. `ConsumerApp` bounds
        the whole close to a shorter time.
        """
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=CLOSE_TIMEOUT_S)
        await self._close_client()
        if self._credential is not None:
            await self._credential.close()

    async def _close_client(self) -> None:
        for _ in range(CLIENT_CLOSE_ATTEMPTS):
            try:
                await self._client.close()
                return
            except RuntimeError as error:
                # azure-servicebus 7.15.0 iterates a WeakSet of its receivers while it
                # awaits their closes. Creating a receiver then adds to the set and
                # commits the removals of receivers garbage-collected since the
                # iteration began, so it fails. Closing again closes the rest.
                failure = error
                await asyncio.sleep(0)
        log.warning(
            "client_close_failed",
            entity=self.entity,
            attempts=CLIENT_CLOSE_ATTEMPTS,
            error=log_exception_text(failure),
        )
