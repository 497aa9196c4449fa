"""Session checkpoint: duplicate detection, parking and the state encoding."""

from __future__ import annotations

import json

import pytest

from consumer.checkpoint import (
    MAX_RECENT_MESSAGE_IDS,
    CheckpointError,
    ParkRecord,
    SessionCheckpoint,
)
from consumer.transport import InboundMessage


def message(sequence_number: int, message_id: str) -> InboundMessage:
    return InboundMessage(
        body=b"{}",
        message_id=message_id,
        session_id="ORD-1",
        sequence_number=sequence_number,
        delivery_count=0,
        enqueued_at=None,
        correlation_id=None,
        subject="ORDER_CREATED",
        handle=None,
    )


def test_fresh_checkpoint_handles_nothing() -> None:
    assert not SessionCheckpoint().is_handled(message(1, "m1"))


def test_redelivery_at_or_below_checkpoint_is_handled() -> None:
    checkpoint = SessionCheckpoint().after_handled(message(5, "m5"))

    assert checkpoint.is_handled(message(5, "m5"))
    assert checkpoint.is_handled(message(3, "m3"))
    assert not checkpoint.is_handled(message(6, "m6"))


def test_repeated_message_id_is_handled() -> None:
    checkpoint = SessionCheckpoint().after_handled(message(5, "m5"))

    assert checkpoint.is_handled(message(9, "m5"))


def test_recent_ids_are_bounded() -> None:
    checkpoint = SessionCheckpoint()
    for number in range(1, MAX_RECENT_MESSAGE_IDS + 11):
        checkpoint = checkpoint.after_handled(message(number, f"m{number}"))

    assert len(checkpoint.recent_message_ids) == MAX_RECENT_MESSAGE_IDS
    assert "m1" not in checkpoint.recent_message_ids
    assert checkpoint.last_sequence_number == MAX_RECENT_MESSAGE_IDS + 10


def test_encoding_round_trips() -> None:
    record = ParkRecord("m2", 2, "MaxRetriesExceeded", "ValueError: boom")
    checkpoint = (
        SessionCheckpoint()
        .after_handled(message(1, "m1"))
        .park(record)
        .with_deferred(3)
        .with_deferred(4)
        .with_deferred(3)
    )

    decoded = SessionCheckpoint.decode(checkpoint.encode())

    assert decoded == checkpoint
    assert decoded.deferred_sequence_numbers == (3, 4)


def test_empty_state_is_fresh() -> None:
    assert SessionCheckpoint.decode(None) == SessionCheckpoint()
    assert SessionCheckpoint.decode(b"") == SessionCheckpoint()


@pytest.mark.parametrize(
    "state", [b"not json", b'{"version": 99}', b'{"version": 1}', b"\xff"]
)
def test_foreign_state_raises(state: bytes) -> None:
    with pytest.raises(CheckpointError):
        SessionCheckpoint.decode(state)


def reference_encoding(checkpoint: SessionCheckpoint) -> bytes:
    """Encode `checkpoint` with `json.dumps`, the text the state had so far."""
    document = {name: json.loads(text) for name, text in checkpoint.other_keys}
    document |= {
        "version": 1,
        "lastSequenceNumber": checkpoint.last_sequence_number,
        "recentMessageIds": list(checkpoint.recent_message_ids),
        "deferredSequenceNumbers": list(checkpoint.deferred_sequence_numbers),
        "parked": None,
    }
    if checkpoint.parked is not None:
        document["parked"] = {
            "messageId": checkpoint.parked.message_id,
            "sequenceNumber": checkpoint.parked.sequence_number,
            "reason": checkpoint.parked.reason,
            "description": checkpoint.parked.description,
        }
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


@pytest.mark.parametrize(
    "checkpoint",
    [
        SessionCheckpoint(),
        SessionCheckpoint(5, ("m1", "id with spaces", "~!#[]")),
        SessionCheckpoint(
            7,
            ('q"uote', "back\\slash", "ünïcode", "tab\t", "\x7f", "emoji 😀"),
            ParkRecord('m"2', 3, "MaxRetriesExceeded", "ValueError: déjà vu"),
            (4, 9),
            (("unpark", '{"skip":true,"amount":1.5}'), ("zé", '"x"')),
        ),
    ],
)
def test_encoding_matches_json_dumps(checkpoint: SessionCheckpoint) -> None:
    encoded = checkpoint.encode()

    assert encoded == reference_encoding(checkpoint)
    assert SessionCheckpoint.decode(encoded) == checkpoint
