"""The oracle of a chaos run: what the journal, the dead-letter queue and the broker's
final state must show, whatever faults happened.

Rules, per published message id:

1. It is handled (in the journal), dead-lettered with a reason, or deferred in a parked
   order. Anything else is lost (gone from the broker) or stuck (still active).
2. Within an order, a message is first handled only after every earlier message of the
   order was first handled. So the first handlings follow publish order, and nothing
   runs past a dead-lettered message, because the orders are parked.
3. A second handling of the same message (same sequence number) needs a fault that was
   going on between the start of the first handling and the second one. The fault must
   be of a kind that can fall between handler and settlement: a killed or stopped
   consumer, a cut connection, an expired session lock or a broker restart. A killed,
   stopped or exited consumer explains only the handlings of that process, and a
   session lock that the broker expired by itself only those of its own order. With
   the checkpoint on, an injected fault must also have begun before the checkpoint of
   the first handling could be written, at most `CHECKPOINT_WRITE_MARGIN_S` after it
   ended. A later fault finds the checkpoint, and the redelivered message is skipped.
4. A second copy (new sequence number) needs a publish retry of that message.
5. No message stays active in the queue, and no deferred message stays in an order
   that is not parked, where nothing would fetch it again.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tests.chaos.journal import JournalEntry
from tests.chaos.plan import PublishedMessage

# A message is received a little before its handlers start, so a fault this close
# before the start can still hit the delivery.
RECEIVE_MARGIN_S = 0.5
# The consumer writes the checkpoint right after the last handler returns, with one
# round trip to the broker. In 16 runs of `run.py --duration 40`, eight at a time on
# 2 cores, every duplicate in a checkpointed run had a fault that began at most 0.2 s
# after the first handling ended.
CHECKPOINT_WRITE_MARGIN_S = 1.0
# Faults that can fall between a handler and its settlement.
DISRUPTING_KINDS = frozenset(
    {
        "kill_consumer",
        "terminate_consumer",
        "restart_broker",
        "cut_connections",
        "broker_cut_connections",
        "expire_session_locks",
        "consumer_exited",
        "lock_expired",
    }
)
# Faults the harness records when they happen but does not inject: a consumer that
# ended by itself, and a session lock the broker expired because no renewal came.
OBSERVED_KINDS = frozenset({"consumer_exited", "lock_expired"})


@dataclass(frozen=True)
class DeadLetterRecord:
    """A message found in the dead-letter queue."""

    message_id: str
    order_id: str
    sequence_number: int
    reason: str
    description: str


@dataclass(frozen=True)
class FinalSession:
    """What the broker still contains of one order after the run."""

    order_id: str
    remaining: tuple[tuple[int, str], ...]
    parked: bool
    deferred_sequence_numbers: tuple[int, ...]


@dataclass(frozen=True)
class InjectedFault:
    """A fault as it happened: kind, what it hit and when, in epoch seconds.

    `at` is when the fault began (the signal or the cut) and `until` when it was
    over: the broker listening again, or the stopped consumer gone. `pid` is the
    consumer process that a kill, a stop or an exit hit, and None for faults of the
    broker or the network, which hit every consumer. `order_id` is the one order
    whose session lock the broker expired, and None for every other fault.
    """

    at: float
    kind: str
    detail: str
    until: float = 0.0
    pid: int | None = None
    order_id: str | None = None

    @property
    def ended_at(self) -> float:
        """End of the fault, never before its start."""
        return max(self.at, self.until)


@dataclass
class Verdict:
    """The oracle's findings: counts for the summary and the violations."""

    counts: dict[str, int] = field(default_factory=dict)
    dead_lettered_by_reason: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)


def judge(
    published: Sequence[PublishedMessage],
    resent: frozenset[str],
    journal: Sequence[JournalEntry],
    dead_letters: Sequence[DeadLetterRecord],
    sessions: Iterable[FinalSession],
    faults: Sequence[InjectedFault],
    checkpoint: bool = False,
) -> Verdict:
    """Check every rule of the module docstring and count what happened."""
    verdict = Verdict()
    first = _first_handlings(journal)
    dead_ids = {record.message_id for record in dead_letters}
    parked_ids, stuck = _final_holdings(sessions, verdict)
    verdict.dead_lettered_by_reason = dict(
        Counter(record.reason for record in dead_letters)
    )
    for record in dead_letters:
        if not record.reason:
            verdict.violations.append(
                f"dead-lettered without a reason: {record.message_id}"
            )
    _check_accounting(published, first, dead_ids, parked_ids, stuck, verdict)
    _check_order(published, first, dead_ids, verdict)
    _check_duplicates(journal, resent, faults, checkpoint, verdict)
    verdict.counts.update(
        published=len(published),
        handled=len(first),
        journal_lines=len(journal),
        dead_lettered=len(dead_letters),
        parked_messages=len(parked_ids),
    )
    return verdict


def _first_handlings(journal: Sequence[JournalEntry]) -> dict[str, JournalEntry]:
    first: dict[str, JournalEntry] = {}
    for entry in sorted(journal, key=lambda item: item.at):
        first.setdefault(entry.message_id, entry)
    return first


def _final_holdings(
    sessions: Iterable[FinalSession], verdict: Verdict
) -> tuple[set[str], set[str]]:
    parked_ids: set[str] = set()
    stuck: set[str] = set()
    for session in sessions:
        for sequence_number, message_id in session.remaining:
            deferred = sequence_number in session.deferred_sequence_numbers
            if deferred and session.parked:
                parked_ids.add(message_id)
                continue
            stuck.add(message_id)
            state = "deferred in an order that is not parked" if deferred else "active"
            verdict.violations.append(
                f"message {message_id} (sequence number {sequence_number}) of order "
                f"{session.order_id} is still {state} after the run"
            )
    return parked_ids, stuck


def _check_accounting(
    published: Sequence[PublishedMessage],
    first: dict[str, JournalEntry],
    dead_ids: set[str],
    parked_ids: set[str],
    stuck: set[str],
    verdict: Verdict,
) -> None:
    both = 0
    for message in published:
        handled = message.message_id in first
        if handled and message.message_id in dead_ids:
            both += 1
        if handled or message.message_id in dead_ids | parked_ids | stuck:
            continue
        verdict.violations.append(
            f"message {message.message_id} (#{message.index}) of order "
            f"{message.order_id} is lost: not handled, not dead-lettered, not parked"
        )
    verdict.counts["handled_and_dead_lettered"] = both


def _check_order(
    published: Sequence[PublishedMessage],
    first: dict[str, JournalEntry],
    dead_ids: set[str],
    verdict: Verdict,
) -> None:
    by_order: dict[str, list[PublishedMessage]] = defaultdict(list)
    for message in published:
        by_order[message.order_id].append(message)
    for order_id, messages in by_order.items():
        latest_at = float("-inf")
        unhandled = ""
        for message in messages:
            entry = first.get(message.message_id)
            if entry is None:
                unhandled = unhandled or message.message_id
                continue
            if unhandled:
                fate = "dead-lettered" if unhandled in dead_ids else "never handled"
                verdict.violations.append(
                    f"order {order_id}: {message.message_id} (#{message.index}) was "
                    f"handled although the earlier {unhandled} was {fate}"
                )
            elif entry.at < latest_at:
                verdict.violations.append(
                    f"order {order_id}: {message.message_id} (#{message.index}) was "
                    "first handled before an earlier message of the order"
                )
            latest_at = max(latest_at, entry.at)


def _check_duplicates(
    journal: Sequence[JournalEntry],
    resent: frozenset[str],
    faults: Sequence[InjectedFault],
    checkpoint: bool,
    verdict: Verdict,
) -> None:
    by_id: dict[str, list[JournalEntry]] = defaultdict(list)
    for entry in sorted(journal, key=lambda item: item.at):
        by_id[entry.message_id].append(entry)
    explained: Counter[str] = Counter()
    for message_id, entries in by_id.items():
        for earlier, later in zip(entries, entries[1:], strict=False):
            cause = _duplicate_cause(earlier, later, resent, faults, checkpoint)
            if cause is None:
                since = "before its checkpoint" if checkpoint else "since its handling"
                verdict.violations.append(
                    f"message {message_id} (sequence number {later.sequence_number}) "
                    f"was handled again at {later.at:.3f} by pid {later.pid} with no "
                    f"fault {since} by pid {earlier.pid} at {earlier.at:.3f}"
                )
            else:
                explained[cause] += 1
    verdict.counts["duplicates"] = sum(explained.values())
    for cause, count in explained.items():
        verdict.counts[f"duplicates_after_{cause}"] = count


def _duplicate_cause(
    earlier: JournalEntry,
    later: JournalEntry,
    resent: frozenset[str],
    faults: Sequence[InjectedFault],
    checkpoint: bool,
) -> str | None:
    """Return the kind of fault that explains the second handling, or None."""
    if later.sequence_number != earlier.sequence_number:
        return "publish_retry" if earlier.message_id in resent else None
    began_at = earlier.started_at - RECEIVE_MARGIN_S
    checkpointed_by = earlier.at + CHECKPOINT_WRITE_MARGIN_S
    for fault in faults:
        if fault.pid is not None and fault.pid != earlier.pid:
            continue
        if fault.order_id is not None and fault.order_id != earlier.order_id:
            continue
        latest_start = later.at
        # The broker timed this expiry itself and applies the checkpoint write and the
        # expiry one after the other. The message came back, so the expiry came
        # first, however slow the write was.
        if checkpoint and fault.kind != "lock_expired":
            latest_start = min(latest_start, checkpointed_by)
        overlaps = fault.at <= latest_start and fault.ended_at >= began_at
        if fault.kind in DISRUPTING_KINDS and overlaps:
            return fault.kind
    return None
