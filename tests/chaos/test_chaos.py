"""A CI-sized chaos run and unit checks of the oracle that judges it."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from tests.chaos.harness import ChaosRun, RunOptions, run_chaos
from tests.chaos.journal import JournalEntry
from tests.chaos.oracle import DeadLetterRecord, FinalSession, InjectedFault, judge
from tests.chaos.plan import FaultKind, PublishedMessage, plan_run
from tests.chaos.summary import render

# Every fault kind is in the schedule of any seed. Publishing ends at 60% of the
# duration and the faults at 70%, so with the drain and the inspection a run takes
# about 100 s on a 2-core machine.
CI_SEED = 2
CI_DURATION_S = 120.0


# azure-servicebus 7.15 leaves the socket, stream writer and transport of a sender
# whose open failed to the garbage collector. The publisher runs in this process, and
# the broker's cuts and restarts make its opens fail.
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:unclosed <socket:ResourceWarning")
@pytest.mark.filterwarnings("ignore:unclosed <StreamWriter:ResourceWarning")
@pytest.mark.filterwarnings("ignore:unclosed transport:ResourceWarning")
async def test_chaos_run_finds_no_violation(tmp_path: Path) -> None:
    report = await run_chaos(
        RunOptions(seed=CI_SEED, duration_s=CI_DURATION_S, work_dir=tmp_path)
    )
    # Collect the leaked SDK objects while the filters above apply, not during a
    # later test of this worker.
    gc.collect()
    summary = render(report)
    assert report.verdict.violations == [], summary
    assert report.verdict.counts["handled"] > 0, summary
    injected = set(report.faults_by_kind)
    expected = {kind.value for kind in FaultKind}
    if not report.broker_durable:
        expected.discard(FaultKind.RESTART_BROKER.value)
    assert expected <= injected, summary


def test_plan_repeats_for_a_seed() -> None:
    first = plan_run(5, 60.0, lock_duration_s=3.0)
    again = plan_run(5, 60.0, lock_duration_s=3.0)
    assert first == again


def test_plan_holds_every_fault_kind() -> None:
    plan = plan_run(5, 30.0, lock_duration_s=3.0)
    assert {fault.kind for fault in plan.faults} == set(FaultKind)


def message(index: int, order_id: str = "ORD-1") -> PublishedMessage:
    return PublishedMessage(index, order_id, f"m{index}", {})


def handled(
    index: int, at: float, pid: int = 1, sequence_number: int | None = None
) -> JournalEntry:
    return JournalEntry(
        order_id="ORD-1",
        message_id=f"m{index}",
        sequence_number=index + 1 if sequence_number is None else sequence_number,
        delivery_count=0,
        pid=pid,
        started_at=at - 0.1,
        at=at,
    )


def verdict_of(
    journal: list[JournalEntry],
    *,
    dead: tuple[DeadLetterRecord, ...] = (),
    sessions: tuple[FinalSession, ...] = (),
    faults: tuple[InjectedFault, ...] = (),
    published: int = 3,
    checkpoint: bool = False,
) -> list[str]:
    messages = [message(index) for index in range(published)]
    verdict = judge(
        messages, frozenset(), journal, dead, sessions, faults, checkpoint=checkpoint
    )
    return verdict.violations


def test_oracle_accepts_ordered_run() -> None:
    journal = [handled(0, 1.0), handled(1, 2.0), handled(2, 3.0)]
    assert verdict_of(journal) == []


def test_oracle_reports_lost_message() -> None:
    violations = verdict_of([handled(0, 1.0), handled(1, 2.0)])
    assert len(violations) == 1
    assert "m2" in violations[0]
    assert "lost" in violations[0]


def test_oracle_reports_reordering() -> None:
    violations = verdict_of([handled(0, 1.0), handled(2, 2.0), handled(1, 3.0)])
    assert any("before an earlier message" in text for text in violations)


def test_oracle_reports_run_past_dead_letter() -> None:
    dead = DeadLetterRecord("m1", "ORD-1", 2, "ChaosPoison", "planned")
    violations = verdict_of([handled(0, 1.0), handled(2, 3.0)], dead=(dead,))
    assert len(violations) == 1
    assert "dead-lettered" in violations[0]


def test_oracle_accepts_parked_order() -> None:
    dead = DeadLetterRecord("m1", "ORD-1", 2, "ChaosPoison", "planned")
    parked = FinalSession(
        "ORD-1", ((3, "m2"),), parked=True, deferred_sequence_numbers=(3,)
    )
    assert verdict_of([handled(0, 1.0)], dead=(dead,), sessions=(parked,)) == []


def test_oracle_reports_stuck_deferred_message() -> None:
    session = FinalSession(
        "ORD-1", ((3, "m2"),), parked=False, deferred_sequence_numbers=(3,)
    )
    violations = verdict_of([handled(0, 1.0), handled(1, 2.0)], sessions=(session,))
    assert any("not parked" in text for text in violations)


def test_oracle_explains_duplicate_by_fault() -> None:
    journal = [
        handled(0, 1.0),
        handled(0, 5.0, pid=2),
        handled(1, 6.0),
        handled(2, 7.0),
    ]
    kill = InjectedFault(at=1.5, kind="kill_consumer", detail="slot 0")
    assert verdict_of(journal, faults=(kill,)) == []


def test_oracle_kill_explains_own_handlings() -> None:
    journal = [
        handled(0, 1.0, pid=7),
        handled(0, 5.0, pid=8),
        handled(1, 6.0),
        handled(2, 7.0),
    ]
    kill_other = InjectedFault(at=1.5, kind="kill_consumer", detail="pid 9", pid=9)
    violations = verdict_of(journal, faults=(kill_other,))
    assert len(violations) == 1
    assert "handled again" in violations[0]
    kill_first = InjectedFault(at=1.5, kind="kill_consumer", detail="pid 7", pid=7)
    assert verdict_of(journal, faults=(kill_first,)) == []


def test_oracle_lock_expiry_explains_own_order() -> None:
    journal = [
        handled(0, 1.0),
        handled(0, 5.0, pid=2),
        handled(1, 6.0),
        handled(2, 7.0),
    ]
    other = InjectedFault(
        at=3.0, kind="lock_expired", detail="order ORD-2", until=3.0, order_id="ORD-2"
    )
    assert len(verdict_of(journal, faults=(other,))) == 1
    own = InjectedFault(
        at=3.0, kind="lock_expired", detail="order ORD-1", until=3.0, order_id="ORD-1"
    )
    assert verdict_of(journal, faults=(own,)) == []
    # The checkpoint margin does not apply: the broker expired the lock before the
    # checkpoint write reached it, or the redelivery would have been skipped.
    assert verdict_of(journal, faults=(own,), checkpoint=True) == []


def test_harness_reads_lock_expiries(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "broker-0.log").write_text(
        "2026-12-04 22:02:03,946 INFO localbus session_lock_expired "
        "store=orders.chaos.events session=ORD-100804 at_ms=1796421723946\n"
        "2026-12-04 22:02:03,969 INFO localbus link_rejected condition=x\n",
        encoding="utf-8",
    )
    run = ChaosRun(RunOptions(seed=1, duration_s=10.0, work_dir=tmp_path), print)
    run.record_lock_expiries()
    assert run.faults == [
        InjectedFault(
            at=1796421723.946,
            kind="lock_expired",
            detail="order ORD-100804",
            until=1796421723.946,
            order_id="ORD-100804",
        )
    ]


def test_oracle_reports_unexplained_duplicate() -> None:
    journal = [
        handled(0, 1.0),
        handled(0, 5.0, pid=2),
        handled(1, 6.0),
        handled(2, 7.0),
    ]
    violations = verdict_of(journal)
    assert len(violations) == 1
    assert "handled again" in violations[0]


def test_oracle_checkpoint_explains_early_fault() -> None:
    journal = [
        handled(0, 1.0),
        handled(0, 5.0, pid=2),
        handled(1, 6.0),
        handled(2, 7.0),
    ]
    # The connection was cut while the first handling ran, so the checkpoint write
    # after it failed too.
    cut = InjectedFault(at=0.95, kind="cut_connections", detail="3 connections")
    assert verdict_of(journal, faults=(cut,), checkpoint=True) == []


def test_oracle_checkpoint_rejects_late_fault() -> None:
    journal = [
        handled(0, 1.0),
        handled(0, 5.0, pid=2),
        handled(1, 6.0),
        handled(2, 7.0),
    ]
    # A kill 2.5 s after the handling came after its checkpoint, so the redelivered
    # message should have been skipped. Without the checkpoint the kill explains it.
    kill = InjectedFault(at=3.5, kind="kill_consumer", detail="slot 0")
    violations = verdict_of(journal, faults=(kill,), checkpoint=True)
    assert len(violations) == 1
    assert "before its checkpoint" in violations[0]
    assert verdict_of(journal, faults=(kill,), checkpoint=False) == []


def test_oracle_reports_dead_letter_without_reason() -> None:
    dead = DeadLetterRecord("m2", "ORD-1", 3, "", "")
    violations = verdict_of([handled(0, 1.0), handled(1, 2.0)], dead=(dead,))
    assert violations == ["dead-lettered without a reason: m2"]
