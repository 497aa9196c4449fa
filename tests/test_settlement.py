"""The settlement decision table, one case per row."""

from __future__ import annotations

import pytest

from consumer import settlement
from consumer.errors import DeadLetter, PermanentError, RetryLater
from consumer.settlement import Action, Outcome


class ShipmentBeforeCapture(PermanentError):
    """A permanent failure declared by a handler module."""


def test_completed_is_complete() -> None:
    decided = settlement.completed()

    assert decided.action is Action.COMPLETE
    assert decided.outcome is Outcome.COMPLETED
    assert not decided.releases_session


@pytest.mark.parametrize(
    "reason",
    ["MalformedBody", "SchemaValidationFailed", "UnknownEventType"],
)
def test_rejected_body_dead_letters(reason: str) -> None:
    decided = settlement.rejected(reason, "payload.orderId: missing", "dead_letter")

    assert decided.action is Action.DEAD_LETTER
    assert decided.reason == reason
    assert decided.description == "payload.orderId: missing"


def test_unknown_type_ignored_by_policy() -> None:
    decided = settlement.rejected("UnknownEventType", "type 'X'", "ignore")

    assert decided.action is Action.COMPLETE
    assert decided.outcome is Outcome.IGNORED


def test_ignore_policy_keeps_malformed_dead_lettered() -> None:
    decided = settlement.rejected("MalformedBody", "not JSON", "ignore")

    assert decided.action is Action.DEAD_LETTER


def test_session_mismatch_names_both_ids() -> None:
    decided = settlement.session_mismatch("ORD-2", "ORD-1")

    assert decided.reason == "SessionMismatch"
    assert "ORD-2" in decided.description
    assert "ORD-1" in decided.description


def test_dead_letter_signal_keeps_reason() -> None:
    decided = settlement.after_failure(
        DeadLetter("FraudSuspected", "score 0.99"), 0, 10
    )

    assert decided.action is Action.DEAD_LETTER
    assert decided.reason == "FraudSuspected"
    assert decided.description == "score 0.99"


def test_permanent_error_uses_class_name() -> None:
    error = ShipmentBeforeCapture("order ORD-1 shipped before capture")

    decided = settlement.after_failure(error, 0, 10)

    assert decided.action is Action.DEAD_LETTER
    assert decided.reason == "ShipmentBeforeCapture"
    assert decided.description == "order ORD-1 shipped before capture"


def test_retryable_failure_abandons() -> None:
    decided = settlement.after_failure(ConnectionError("db down"), 0, 10)

    assert decided.action is Action.ABANDON
    assert decided.releases_session


def test_retry_later_abandons_when_spent() -> None:
    decided = settlement.after_failure(RetryLater(1.0), 3, 10)

    assert decided.action is Action.ABANDON


@pytest.mark.parametrize(
    ("delivery_count", "max_delivery_count", "action"),
    [
        (0, 1, Action.DEAD_LETTER),
        (0, 2, Action.ABANDON),
        (1, 2, Action.DEAD_LETTER),
        (8, 10, Action.ABANDON),
        (9, 10, Action.DEAD_LETTER),
    ],
)
def test_last_delivery_dead_letters(
    delivery_count: int, max_delivery_count: int, action: Action
) -> None:
    error = ValueError("boom")

    decided = settlement.after_failure(error, delivery_count, max_delivery_count)

    assert decided.action is action
    if action is Action.DEAD_LETTER:
        assert decided.reason == "MaxRetriesExceeded"
        assert decided.description == "ValueError: boom"


def test_failure_description_is_bounded() -> None:
    error = RuntimeError("x" * 10_000)

    decided = settlement.after_failure(error, 9, 10)

    assert len(decided.description) == settlement.MAX_DESCRIPTION_CHARS
    assert decided.description.startswith("RuntimeError: xxx")
    assert decided.description.endswith("...")


def test_deferred_and_duplicate_outcomes() -> None:
    assert settlement.deferred().action is Action.DEFER
    assert settlement.duplicate().action is Action.COMPLETE
    assert settlement.duplicate().outcome is Outcome.DUPLICATE
