"""Only a copy the tools sent can claim an earlier original sequence number.

`dlq resubmit` and `sessions unpark` mark each copy with the sequence number of the
message it copies, and the consumer orders and rejects copies by it. A producer can
set the same application property on any message, so the consumer believes it only
where the tools could have written it: a positive number below the copy's own.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from consumer.dlq import ORIGINAL_SEQUENCE_PROPERTY, original_sequence_number
from consumer.transport.azure import _to_inbound

OWN_NUMBER = 100


def _message(value: object) -> SimpleNamespace:
    properties = {} if value is None else {ORIGINAL_SEQUENCE_PROPERTY.encode(): value}
    return SimpleNamespace(
        application_properties=properties,
        sequence_number=OWN_NUMBER,
        body_type=None,
        body=None,
        message_id="m-1",
        session_id="ORD-1",
        delivery_count=0,
        enqueued_time_utc=None,
        correlation_id=None,
        subject="ORDER_UPDATED",
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (40, 40),
        (b"40", 40),
        ("40", 40),
        # Values the tools never write: not below the copy's own number, not
        # positive, or not a number. The message is then its own original.
        (OWN_NUMBER, OWN_NUMBER),
        (999_999_999, OWN_NUMBER),
        (0, OWN_NUMBER),
        (-5, OWN_NUMBER),
        (True, OWN_NUMBER),
        ("forty", OWN_NUMBER),
        (None, OWN_NUMBER),
    ],
)
def test_original_number_trusts_only_earlier(value: object, expected: int) -> None:
    assert original_sequence_number(_message(value)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"), [(40, 40), (-5, None), (999_999_999, None), (None, None)]
)
def test_inbound_copy_marker_trusts_only_earlier(
    value: object, expected: int | None
) -> None:
    inbound = _to_inbound(_message(value), "ORD-1")  # type: ignore[arg-type]
    assert inbound.original_sequence_number == expected
