"""The seeded plan of one chaos run: the order stream, handler faults and fault times.

Everything random in a run comes from `random.Random(seed)` here, so the same seed and
duration give the same stream, the same disturbed messages and the same fault schedule.
Process timing still varies between runs, so a seed repeats the faults, not the exact
interleaving.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from consumer.generate import generate_stream
from consumer.publish import message_id_for
from tests.chaos.journal import HandlerFaults

# Shares of the messages that the journal handler disturbs.
POISON_ORDER_SHARE = 0.03
FLAKY_SHARE = 0.02
SLOW_SHARE = 0.01
# Orders per second of run time: enough to keep three consumers busy through the
# fault window without leaving a long tail to drain at the end.
ORDERS_PER_S = 1.5
MIN_ORDERS = 40
# Faults fall in this part of the run; the rest lets the consumers drain.
FAULT_WINDOW = (0.1, 0.7)
SECONDS_PER_FAULT = 8.0


class FaultKind(StrEnum):
    """The faults the harness injects."""

    KILL_CONSUMER = "kill_consumer"
    TERMINATE_CONSUMER = "terminate_consumer"
    RESTART_BROKER = "restart_broker"
    CUT_CONNECTIONS = "cut_connections"
    BROKER_CUT_CONNECTIONS = "broker_cut_connections"
    EXPIRE_SESSION_LOCKS = "expire_session_locks"


@dataclass(frozen=True)
class PlannedFault:
    """A fault at `at_s` seconds after the start, on consumer `target` if it has one."""

    at_s: float
    kind: FaultKind
    target: int
    restart_after_s: float
    hard: bool


@dataclass(frozen=True)
class PublishedMessage:
    """One event of the stream with the message id it is published under."""

    index: int
    order_id: str
    message_id: str
    event: dict[str, Any]


@dataclass(frozen=True)
class ChaosPlan:
    """Stream, handler faults, fault schedule and consumer options of one run."""

    seed: int
    duration_s: float
    consumers: int
    checkpoint: bool
    messages: tuple[PublishedMessage, ...]
    handler_faults: HandlerFaults
    faults: tuple[PlannedFault, ...]


def plan_run(
    seed: int,
    duration_s: float,
    *,
    consumers: int = 3,
    lock_duration_s: float,
    kinds: tuple[FaultKind, ...] = tuple(FaultKind),
    checkpoint: bool | None = None,
) -> ChaosPlan:
    """Draw the plan of a run of `duration_s` seconds from `seed`.

    `kinds` limits the faults, for example to leave out broker restarts when the broker
    cannot keep messages across a restart. `checkpoint` None lets the seed choose.
    """
    rng = random.Random(seed)
    orders = max(MIN_ORDERS, int(duration_s * ORDERS_PER_S))
    messages = _messages(generate_stream(orders, seed=rng.randrange(2**31)))
    faults = _handler_faults(rng, messages, lock_duration_s)
    schedule = _schedule(rng, duration_s, consumers, kinds)
    return ChaosPlan(
        seed=seed,
        duration_s=duration_s,
        consumers=consumers,
        checkpoint=rng.random() < 0.5 if checkpoint is None else checkpoint,
        messages=messages,
        handler_faults=faults,
        faults=schedule,
    )


def _messages(events: list[dict[str, Any]]) -> tuple[PublishedMessage, ...]:
    return tuple(
        PublishedMessage(
            index=index,
            order_id=event["payload"]["orderId"],
            message_id=message_id_for(event),
            event=event,
        )
        for index, event in enumerate(events)
    )


def _handler_faults(
    rng: random.Random, messages: tuple[PublishedMessage, ...], lock_duration_s: float
) -> HandlerFaults:
    by_order: dict[str, list[str]] = {}
    for message in messages:
        by_order.setdefault(message.order_id, []).append(message.message_id)
    poison = set()
    for ids in by_order.values():
        # Never the first message, so a parked order has handled messages before
        # its poison and deferred ones after it.
        if len(ids) > 2 and rng.random() < POISON_ORDER_SHARE:
            poison.add(rng.choice(ids[1:-1]))
    others = [m.message_id for m in messages if m.message_id not in poison]
    flaky = {m for m in others if rng.random() < FLAKY_SHARE}
    slow = {m for m in others if m not in flaky and rng.random() < SLOW_SHARE}
    return HandlerFaults(
        poison=frozenset(poison),
        flaky=frozenset(flaky),
        slow=frozenset(slow),
        slow_s=lock_duration_s * 1.5,
    )


def _schedule(
    rng: random.Random,
    duration_s: float,
    consumers: int,
    kinds: tuple[FaultKind, ...],
) -> tuple[PlannedFault, ...]:
    start_s, end_s = (share * duration_s for share in FAULT_WINDOW)
    count = max(len(kinds), int((end_s - start_s) / SECONDS_PER_FAULT))
    # Every kind once, then a random mix, so that even a short run injects each kind.
    chosen = list(kinds) + [rng.choice(kinds) for _ in range(count - len(kinds))]
    rng.shuffle(chosen)
    times = sorted(rng.uniform(start_s, end_s) for _ in chosen)
    return tuple(
        PlannedFault(
            at_s=at_s,
            kind=kind,
            target=rng.randrange(consumers),
            restart_after_s=rng.uniform(0.2, 3.0),
            hard=rng.random() < 0.5,
        )
        for at_s, kind in zip(times, chosen, strict=True)
    )
