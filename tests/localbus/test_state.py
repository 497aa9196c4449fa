"""The broker state machine on its own, with a fake clock and no sockets."""

from __future__ import annotations

import logging
import uuid

import pytest

from localbus.config import (
    CorrelationFilter,
    QueueConfig,
    QueueSettings,
    SubscriptionConfig,
    TopicConfig,
)
from localbus.errors import (
    MESSAGE_LOCK_LOST,
    NOT_ALLOWED,
    NOT_FOUND,
    SESSION_CANNOT_BE_LOCKED,
    SESSION_LOCK_LOST,
    BrokerError,
)
from localbus.messages import IncomingMessage
from localbus.records import MessagesReady, Outcome, SessionGranted, SessionLost
from localbus.state import BrokerState

QUEUE = "orders"


class Clock:
    """Manual clock in seconds."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_state(clock: Clock, **settings: object) -> BrokerState:
    queue_settings = QueueSettings(
        **{"lock_duration_s": 10.0, "max_delivery_count": 3, **settings}  # type: ignore[arg-type]
    )
    plain = QueueSettings(requires_session=False, lock_duration_s=10.0)
    entities = [
        QueueConfig(QUEUE, queue_settings),
        QueueConfig("plain", plain, duplicate_detection=True),
    ]
    return BrokerState(entities, clock=clock)


def message(
    body: str, session_id: str | None = "s1", **fields: object
) -> IncomingMessage:
    return IncomingMessage(payload=body.encode(), session_id=session_id, **fields)  # type: ignore[arg-type]


def accept(
    state: BrokerState, receiver_id: int, session_id: str | None = None
) -> str | None:
    result = state.attach_receiver(
        receiver_id, QUEUE, session_id=session_id, session_filter=True
    )
    return result.session_id


def test_session_fifo_and_abandon_to_head(clock: Clock) -> None:
    state = make_state(clock)
    state.send(QUEUE, [message("a"), message("b"), message("c")])
    assert accept(state, 1) == "s1"
    first = state.receive(1)
    second = state.receive(1)
    assert first is not None and second is not None
    assert (first.payload, second.payload) == (b"a", b"b")
    state.settle(QUEUE, first.lock_token, Outcome.ABANDON)  # type: ignore[arg-type]
    again = state.receive(1)
    assert again is not None
    assert again.payload == b"a"
    assert again.delivery_count == 1
    third = state.receive(1)
    assert third is not None and third.payload == b"c"


def test_max_delivery_count_moves_to_dead_letter(clock: Clock) -> None:
    state = make_state(clock)
    state.send(QUEUE, [message("poison")])
    accept(state, 1)
    for _ in range(3):
        delivery = state.receive(1)
        assert delivery is not None
        state.settle(QUEUE, delivery.lock_token, Outcome.ABANDON)  # type: ignore[arg-type]
    assert state.receive(1) is None
    dead = state.stores[f"{QUEUE}/$deadletterqueue"].messages
    (stored,) = dead.values()
    assert stored.dead_letter_reason == "MaxDeliveryCountExceeded"
    assert stored.delivery_count == 3


def test_named_accept_of_held_session_fails(clock: Clock) -> None:
    state = make_state(clock)
    state.send(QUEUE, [message("a")])
    accept(state, 1, "s1")
    with pytest.raises(BrokerError) as caught:
        accept(state, 2, "s1")
    assert caught.value.condition == SESSION_CANNOT_BE_LOCKED


def test_waiting_accept_granted_on_arrival(clock: Clock) -> None:
    state = make_state(clock)
    result = state.attach_receiver(1, QUEUE, session_filter=True)
    assert result.waiting
    state.drain_events()
    state.send(QUEUE, [message("a", session_id="late")])
    events = state.drain_events()
    granted = [event for event in events if isinstance(event, SessionGranted)]
    assert granted == [SessionGranted(1, "late", granted[0].locked_until_ms)]
    assert MessagesReady(1) in events


def test_cancelled_accept_is_not_granted(clock: Clock) -> None:
    state = make_state(clock)
    state.attach_receiver(1, QUEUE, session_filter=True)
    assert state.cancel_accept(1)
    state.send(QUEUE, [message("a")])
    assert not any(isinstance(e, SessionGranted) for e in state.drain_events())
    assert accept(state, 2) == "s1"


def test_session_lock_expiry_returns_messages(clock: Clock) -> None:
    state = make_state(clock)
    state.send(QUEUE, [message("a"), message("b")])
    accept(state, 1)
    first = state.receive(1)
    assert first is not None
    state.drain_events()
    clock.advance(10.5)
    state.fire_deadlines()
    assert SessionLost(1, "s1") in state.drain_events()
    with pytest.raises(BrokerError) as caught:
        state.settle(QUEUE, first.lock_token, Outcome.COMPLETE)  # type: ignore[arg-type]
    assert caught.value.condition in (MESSAGE_LOCK_LOST, SESSION_LOCK_LOST)
    assert accept(state, 2) == "s1"
    again = state.receive(2)
    assert again is not None
    assert again.payload == b"a"
    assert again.delivery_count == 1


def test_session_lock_expiry_is_logged(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    state = make_state(clock)
    state.send(QUEUE, [message("a")])
    accept(state, 1)
    clock.advance(10.5)
    with caplog.at_level(logging.INFO, logger="localbus"):
        state.fire_deadlines()
    expected = f"session_lock_expired store={QUEUE} session=s1 at_ms={state.now_ms()}"
    assert expected in caplog.messages
    # The admin node's expiry is injected, and it logs a line of its own instead.
    accept(state, 2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="localbus"):
        assert state.expire_session_locks(QUEUE) == ["s1"]
    assert not any("session_lock_expired" in text for text in caplog.messages)


def test_renewed_session_lock_survives_old_deadline(clock: Clock) -> None:
    state = make_state(clock)
    state.send(QUEUE, [message("a")])
    accept(state, 1)
    clock.advance(8)
    state.renew_session_lock(QUEUE, "s1")
    clock.advance(5)
    state.fire_deadlines()
    assert not any(isinstance(e, SessionLost) for e in state.drain_events())
    assert state.held_session(QUEUE, "s1")[1].holder == 1


def test_detach_returns_unsettled_in_sequence_order(clock: Clock) -> None:
    state = make_state(clock)
    state.send(QUEUE, [message("a"), message("b"), message("c")])
    accept(state, 1)
    assert state.receive(1) is not None
    assert state.receive(1) is not None
    state.detach_receiver(1)
    accept(state, 2)
    payloads = []
    while (delivery := state.receive(2)) is not None:
        payloads.append(delivery.payload)
    assert payloads == [b"a", b"b", b"c"]


def test_defer_and_session_state(clock: Clock) -> None:
    state = make_state(clock)
    state.send(QUEUE, [message("a"), message("b")])
    accept(state, 1)
    first = state.receive(1)
    assert first is not None
    state.settle(QUEUE, first.lock_token, Outcome.DEFER)  # type: ignore[arg-type]
    second = state.receive(1)
    assert second is not None and second.payload == b"b"
    assert state.receive(1) is None
    state.set_session_state(QUEUE, "s1", b"state")
    assert state.held_session(QUEUE, "s1")[1].state == b"state"


def test_plain_queue_message_lock_expiry(clock: Clock) -> None:
    state = make_state(clock)
    state.send("plain", [message("a", session_id=None)])
    state.attach_receiver(1, "plain")
    delivery = state.receive(1)
    assert delivery is not None
    clock.advance(11)
    state.fire_deadlines()
    with pytest.raises(BrokerError) as caught:
        state.settle("plain", delivery.lock_token, Outcome.COMPLETE)  # type: ignore[arg-type]
    assert caught.value.condition == MESSAGE_LOCK_LOST
    again = state.receive(1)
    assert again is not None
    assert again.delivery_count == 1


def test_duplicate_message_id_is_dropped(clock: Clock) -> None:
    state = make_state(clock)
    numbers = state.send(
        "plain",
        [message("a", None, message_id="m1"), message("b", None, message_id="m1")],
    )
    assert numbers[1] == 0
    assert len(state.stores["plain"].messages) == 1


def test_scheduled_message_appears_when_due(clock: Clock) -> None:
    state = make_state(clock)
    due_ms = int((clock.now + 5) * 1000)
    (number,) = state.send(QUEUE, [message("later", scheduled_at_ms=due_ms)])
    assert state.stores[QUEUE].messages == {}
    clock.advance(5)
    state.fire_deadlines()
    (enqueued,) = state.stores[QUEUE].messages.values()
    assert enqueued.payload == message("later").payload
    assert enqueued.enqueued_at_ms == due_ms


def test_scheduled_message_gets_new_sequence_number(clock: Clock) -> None:
    state = make_state(clock)
    due_ms = int((clock.now + 5) * 1000)
    (scheduled,) = state.send(QUEUE, [message("later", scheduled_at_ms=due_ms)])
    (sent,) = state.send(QUEUE, [message("now")])
    clock.advance(5)
    state.fire_deadlines()
    numbers = sorted(state.stores[QUEUE].messages)
    assert scheduled not in numbers
    assert numbers[0] == sent
    assert numbers[1] > sent
    assert accept(state, 1, "s1") == "s1"
    first = state.receive(1)
    assert first is not None
    assert first.payload == message("now").payload


def test_cancelled_schedule_never_appears(clock: Clock) -> None:
    state = make_state(clock)
    due_ms = int((clock.now + 5) * 1000)
    (number,) = state.send(QUEUE, [message("later", scheduled_at_ms=due_ms)])
    state.cancel_scheduled(QUEUE, [number])
    clock.advance(6)
    state.fire_deadlines()
    assert state.stores[QUEUE].messages == {}


def test_ttl_expiry_dead_letters_when_configured(clock: Clock) -> None:
    state = make_state(clock, dead_letter_on_expiration=True)
    state.send(QUEUE, [message("short", ttl_s=1.0)])
    clock.advance(2)
    state.fire_deadlines()
    dead = state.stores[f"{QUEUE}/$deadletterqueue"].messages
    (stored,) = dead.values()
    assert stored.dead_letter_reason == "TTLExpiredException"


def test_ttl_expiry_drops_without_dead_lettering(clock: Clock) -> None:
    state = make_state(clock)
    state.send(QUEUE, [message("short", ttl_s=1.0)])
    clock.advance(2)
    accept(state, 1)
    assert state.receive(1) is None
    assert state.stores[f"{QUEUE}/$deadletterqueue"].messages == {}


def test_topic_routes_by_subject(clock: Clock) -> None:
    topic = TopicConfig(
        "events",
        subscriptions=(
            SubscriptionConfig("all", QueueSettings(requires_session=False)),
            SubscriptionConfig(
                "created",
                QueueSettings(requires_session=False),
                rules=(CorrelationFilter(subject="ORDER_CREATED"),),
            ),
        ),
    )
    state = BrokerState([topic], clock=clock)
    state.send("events", [message("1", None, subject="ORDER_CREATED")])
    state.send("events", [message("2", None, subject="ORDER_PAID")])
    assert len(state.stores["events/subscriptions/all"].messages) == 2
    assert len(state.stores["events/subscriptions/created"].messages) == 1


def test_unknown_entity_and_wrong_receiver_kind(clock: Clock) -> None:
    state = make_state(clock)
    with pytest.raises(BrokerError) as missing:
        state.send("nope", [message("a")])
    assert missing.value.condition == NOT_FOUND
    with pytest.raises(BrokerError) as sessionless:
        state.attach_receiver(1, QUEUE)
    assert sessionless.value.condition == NOT_ALLOWED


def test_unknown_lock_token_is_lock_lost(clock: Clock) -> None:
    state = make_state(clock)
    with pytest.raises(BrokerError) as caught:
        state.settle("plain", uuid.uuid4(), Outcome.COMPLETE)
    assert caught.value.condition == MESSAGE_LOCK_LOST


def test_dead_letter_inside_dead_letter_queue_keeps_message(clock: Clock) -> None:
    state = make_state(clock)
    state.send("plain", [message("a", session_id=None)])
    state.attach_receiver(1, "plain")
    delivery = state.receive(1)
    assert delivery is not None
    state.settle("plain", delivery.lock_token, Outcome.DEAD_LETTER, "First")  # type: ignore[arg-type]
    state.attach_receiver(2, "plain/$DeadLetterQueue")
    dead = state.receive(2)
    assert dead is not None
    assert dead.dead_letter_reason == "First"
    state.settle(
        "plain/$deadletterqueue", dead.lock_token, Outcome.DEAD_LETTER, "Second"
    )  # type: ignore[arg-type]
    again = state.receive(2)
    assert again is not None
    assert again.dead_letter_reason == "Second"
    assert again.dead_letter_source == "plain"


def test_expire_session_locks_now(clock: Clock) -> None:
    state = make_state(clock)
    state.send(QUEUE, [message("a"), message("b", session_id="s2")])
    assert accept(state, 1, "s1") == "s1"
    assert accept(state, 2, "s2") == "s2"
    delivery = state.receive(1)
    assert delivery is not None
    state.drain_events()
    assert state.expire_session_locks(QUEUE, "s1") == ["s1"]
    assert SessionLost(1, "s1") in state.drain_events()
    assert state.stores[QUEUE].sessions["s2"].holder == 2
    assert accept(state, 3, "s1") == "s1"
    again = state.receive(3)
    assert again is not None
    assert again.delivery_count == 1


def test_expire_session_locks_filters_entity(clock: Clock) -> None:
    state = make_state(clock)
    state.send(QUEUE, [message("a")])
    accept(state, 1, "s1")
    assert state.expire_session_locks("plain") == []
    assert state.expire_session_locks("ORDERS") == ["s1"]
    assert state.expire_session_locks() == []
