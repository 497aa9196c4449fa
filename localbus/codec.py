"""AMQP 1.0 message encoding for the broker, on python-qpid-proton's `Data` codec.

Stored payloads are the encoded messages exactly as senders sent them. Outgoing
deliveries reuse their bare-message sections byte for byte. They get a new header and
new message annotations, because the SDK reads the delivery count from the header and
the sequence number, enqueued time and lock expiry from the annotations.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from proton import Data, Described, symbol, timestamp, ubyte, uint, ulong

from localbus.errors import DECODE_ERROR, MESSAGE_SIZE_EXCEEDED, BrokerError
from localbus.messages import Delivery, IncomingMessage

HEADER = 0x70
DELIVERY_ANNOTATIONS = 0x71
MESSAGE_ANNOTATIONS = 0x72
PROPERTIES = 0x73
APPLICATION_PROPERTIES = 0x74
DATA = 0x75
FOOTER = 0x78

SCHEDULED_ENQUEUE_TIME = symbol("x-opt-scheduled-enqueue-time")
SEQUENCE_NUMBER = symbol("x-opt-sequence-number")
ENQUEUED_TIME = symbol("x-opt-enqueued-time")
LOCKED_UNTIL = symbol("x-opt-locked-until")
DEAD_LETTER_SOURCE = symbol("x-opt-deadletter-source")
DEAD_LETTER_REASON = "DeadLetterReason"
DEAD_LETTER_DESCRIPTION = "DeadLetterErrorDescription"


class MalformedMessage(ValueError):
    """The transferred bytes are not a valid AMQP message."""


@dataclass(frozen=True)
class Section:
    """One top-level section of an encoded message."""

    code: int
    raw: bytes
    value: Any


def split_sections(payload: bytes) -> list[Section]:
    """Decode the described sections of an encoded message, keeping their bytes."""
    sections = []
    offset = 0
    while offset < len(payload):
        data = Data()
        try:
            consumed = data.decode(payload[offset:])
        except Exception as error:  # proton raises DataException and others
            raise MalformedMessage(f"undecodable section at byte {offset}") from error
        if consumed <= 0:
            raise MalformedMessage(f"empty section at byte {offset}")
        data.rewind()
        data.next()
        value = copy_binary(data.get_object())
        if not isinstance(value, Described):
            raise MalformedMessage(f"section at byte {offset} is not a described type")
        code = value.descriptor
        if not isinstance(code, int) or not HEADER <= code <= FOOTER:
            raise MalformedMessage(f"unknown section descriptor {code!r}")
        sections.append(
            Section(int(code), payload[offset : offset + consumed], value.value)
        )
        offset += consumed
    return sections


def copy_binary(value: Any) -> Any:
    """Copy binary values out of proton's buffers, which are reused after decoding."""
    if isinstance(value, memoryview):
        return value.tobytes()
    if isinstance(value, Described):
        return Described(value.descriptor, copy_binary(value.value))
    if isinstance(value, dict):
        return type(value)({key: copy_binary(item) for key, item in value.items()})
    if isinstance(value, list):
        return [copy_binary(item) for item in value]
    return value


def split_batch(payload: bytes) -> list[bytes] | None:
    """Return the inner messages of a batch transfer, or None for a single message.

    NOTE: python-qpid-proton does not expose the transfer's message-format
    (0x80013700 for Service Bus batches), so a batch is recognised by its body: only
    data sections, each holding a complete encoded message. A single message whose
    data sections happen to be encoded AMQP messages is taken for a batch.
    """
    sections = split_sections(payload)
    bodies = [section for section in sections if section.code == DATA]
    others = [
        s for s in sections if s.code not in (DATA, MESSAGE_ANNOTATIONS, PROPERTIES)
    ]
    if not bodies or others:
        return None
    inner = []
    for section in bodies:
        candidate = bytes(section.value)
        if (
            not candidate.startswith(b"\x00\x53")
            or not HEADER <= candidate[2] <= FOOTER
        ):
            return None
        try:
            split_sections(candidate)
        except MalformedMessage:
            return None
        inner.append(candidate)
    return inner


def read_transfer(payload: bytes, path: str, max_size: int) -> list[IncomingMessage]:
    """Decode one transfer, a single message or a batch, sent to `path`."""
    if len(payload) > max_size:
        raise BrokerError(
            MESSAGE_SIZE_EXCEEDED,
            f"the message of {len(payload)} bytes exceeds the maximum size of "
            f"{max_size} bytes of {path!r}",
        )
    try:
        inner = split_batch(payload)
        return [read_incoming(body) for body in (inner or [payload])]
    except MalformedMessage as error:
        raise BrokerError(DECODE_ERROR, f"invalid message: {error}") from error


def read_incoming(payload: bytes) -> IncomingMessage:
    """Extract the fields the broker routes and schedules on from a message."""
    fields: dict[str, Any] = {}
    ttl_s = None
    scheduled_at_ms = None
    for section in split_sections(payload):
        if section.code == HEADER and isinstance(section.value, list):
            header = section.value + [None] * 5
            ttl_s = header[2] / 1000 if header[2] else None
        elif section.code == PROPERTIES and isinstance(section.value, list):
            fields.update(_routing_properties(section.value))
        elif section.code == MESSAGE_ANNOTATIONS and isinstance(section.value, dict):
            scheduled = section.value.get(SCHEDULED_ENQUEUE_TIME)
            scheduled_at_ms = int(scheduled) if scheduled else None
        elif section.code == APPLICATION_PROPERTIES and isinstance(section.value, dict):
            fields["application_properties"] = tuple(
                (str(key), value) for key, value in section.value.items()
            )
    return IncomingMessage(
        payload=payload, ttl_s=ttl_s, scheduled_at_ms=scheduled_at_ms, **fields
    )


def _routing_properties(values: list[Any]) -> dict[str, str | None]:
    padded = values + [None] * 13
    names = {
        "message_id": 0,
        "to": 2,
        "subject": 3,
        "reply_to": 4,
        "correlation_id": 5,
        "content_type": 6,
        "session_id": 10,
    }
    return {name: _text(padded[index]) for name, index in names.items()}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    return str(value)


def encode_delivery(delivery: Delivery) -> bytes:
    """Encode a stored message for sending, with the broker's header and annotations."""
    header: list[Any] = [None, None, None, None, None]
    annotations: dict[Any, Any] = {}
    body: list[bytes] = []
    for section in split_sections(delivery.payload):
        if section.code == HEADER and isinstance(section.value, list):
            header = (section.value + [None] * 5)[:5]
        elif section.code == MESSAGE_ANNOTATIONS and isinstance(section.value, dict):
            annotations = dict(section.value)
        elif section.code == APPLICATION_PROPERTIES and delivery.dead_letter_reason:
            continue
        elif section.code != DELIVERY_ANNOTATIONS:
            body.append(section.raw)
    annotations.update(_broker_annotations(delivery))
    parts = [_encode_header(header, delivery.delivery_count)]
    parts.append(encode_value(Described(ulong(MESSAGE_ANNOTATIONS), annotations)))
    parts.extend(_with_dead_letter_properties(delivery, body))
    return b"".join(parts)


def _broker_annotations(delivery: Delivery) -> dict[symbol, Any]:
    annotations: dict[symbol, Any] = {
        SEQUENCE_NUMBER: delivery.sequence_number,
        ENQUEUED_TIME: timestamp(delivery.enqueued_at_ms),
    }
    if delivery.lock_token is not None:
        annotations[LOCKED_UNTIL] = timestamp(delivery.locked_until_ms)
    if delivery.dead_letter_source is not None:
        annotations[DEAD_LETTER_SOURCE] = delivery.dead_letter_source
    return annotations


def _encode_header(header: list[Any], delivery_count: int) -> bytes:
    # Encoded by hand because proton's message codec leaves out a zero delivery
    # count, and the SDK reports a missing count as None instead of 0.
    durable, priority, ttl, first_acquirer, _ = header
    fields = [
        bool(durable),
        ubyte(int(priority)) if priority is not None else ubyte(4),
        uint(int(ttl)) if ttl else None,
        delivery_count == 0 if first_acquirer is None else bool(first_acquirer),
        uint(delivery_count),
    ]
    return encode_value(Described(ulong(HEADER), fields))


def _with_dead_letter_properties(delivery: Delivery, body: list[bytes]) -> list[bytes]:
    if not delivery.dead_letter_reason:
        return body
    properties: dict[str, Any] = {}
    for section in split_sections(delivery.payload):
        if section.code == APPLICATION_PROPERTIES and isinstance(section.value, dict):
            properties = dict(section.value)
    properties[DEAD_LETTER_REASON] = delivery.dead_letter_reason
    properties[DEAD_LETTER_DESCRIPTION] = delivery.dead_letter_description or ""
    encoded = encode_value(Described(ulong(APPLICATION_PROPERTIES), properties))
    # Application properties go right after the properties section, before the body.
    position = 0
    for index, raw in enumerate(body):
        if raw[2] == PROPERTIES:
            position = index + 1
    return body[:position] + [encoded] + body[position:]


def encode_value(value: Any) -> bytes:
    """Encode one Python value with proton's type mapping."""
    data = Data()
    data.put_object(value)
    return data.encode()


def lock_token_of(tag: bytes) -> uuid.UUID:
    """Return the lock token carried by a 16-byte delivery tag (little-endian UUID)."""
    return uuid.UUID(bytes_le=bytes(tag))


def tag_of(token: uuid.UUID) -> bytes:
    """Return the delivery tag that carries `token` the way the SDK decodes it."""
    return token.bytes_le
