"""One chaos run: broker, proxy, consumers, publisher and faults, then the oracle.

The broker runs as `python -m localbus` in its own process, with `--data-dir` when the
broker supports it. Consumers connect through `ConnectionCutter`, so their connections
can be cut; the publisher and the final inspection connect to the broker directly.
Everything listens on 127.0.0.1 on ports picked at start, and every process started
here is stopped before `run_chaos` returns or raises.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consumer.config import load_settings, local_connection_string
from consumer.errors import TransportError
from consumer.publish import SendRetryPolicy, build_message, publish_messages
from localbus.admin_client import AdminError
from tests.chaos.broker_state import read_dead_letters, read_sessions
from tests.chaos.journal import read_journal
from tests.chaos.oracle import InjectedFault, Verdict, judge
from tests.chaos.plan import ChaosPlan, FaultKind, PlannedFault, plan_run
from tests.chaos.processes import (
    BrokerLauncher,
    ConsumerPool,
    ConsumerProcess,
    write_consumer_config,
)
from tests.chaos.proxy import ConnectionCutter

ENTITY = "orders.chaos.events"
MAX_DELIVERY_COUNT = 10
CHUNK_MESSAGES = 25
# The publisher sends its chunks during this share of the run.
PUBLISH_WINDOW = 0.6
# A chunk that cannot be sent for this long is given up and reported as unsent.
PUBLISH_GIVE_UP_S = 60.0
MONITOR_INTERVAL_S = 0.5
# The broker's line for a session lock that expired because no renewal came in time.
LOCK_EXPIRED_LINE = re.compile(
    r"session_lock_expired store=\S+ session=(\S+) at_ms=(\d+)"
)


@dataclass(frozen=True)
class RunOptions:
    """Inputs of a run. `lock_duration_s` is the broker's session lock duration."""

    seed: int
    duration_s: float
    work_dir: Path
    consumers: int = 3
    lock_duration_s: float = 3.0
    settle_s: float = 8.0
    max_drain_s: float = 90.0
    checkpoint: bool | None = None


@dataclass
class ChaosReport:
    """What a run did and what the oracle found."""

    seed: int
    checkpoint: bool
    broker_durable: bool
    faults_by_kind: dict[str, int]
    unsent: int
    resent: int
    verdict: Verdict
    elapsed_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the oracle found no violation."""
        return not self.verdict.violations


def broker_is_durable() -> bool:
    """Whether this localbus keeps messages across a restart (`--data-dir`)."""
    return importlib.util.find_spec("localbus.sqlite_journal") is not None


class ChaosRun:
    """The moving parts of one run and the record of what happened to them."""

    def __init__(self, options: RunOptions, log: Callable[[str], None]) -> None:
        self.options = options
        self.log = log
        self.durable = broker_is_durable()
        kinds = tuple(FaultKind)
        if not self.durable:
            kinds = tuple(k for k in kinds if k is not FaultKind.RESTART_BROKER)
        self.plan: ChaosPlan = plan_run(
            options.seed,
            options.duration_s,
            consumers=options.consumers,
            lock_duration_s=options.lock_duration_s,
            kinds=kinds,
            checkpoint=options.checkpoint,
        )
        self.faults: list[InjectedFault] = []
        self.notes: list[str] = []
        self.resent: set[str] = set()
        self.unsent: set[str] = set()
        self.started_at = time.time()
        self.restarting: set[int] = set()
        self.broker: BrokerLauncher | None = None
        self.proxy: ConnectionCutter | None = None
        self.pool: ConsumerPool | None = None

    # Set-up --------------------------------------------------------------------------

    def start_broker(self) -> BrokerLauncher:
        data_dir = self.options.work_dir / "broker" if self.durable else None
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
        arguments = [
            "--entity",
            ENTITY,
            "--lock-duration-s",
            str(self.options.lock_duration_s),
            "--max-delivery-count",
            str(MAX_DELIVERY_COUNT),
            # Session locks, unlocks and renewals, to explain a failed run.
            "--log-level",
            "debug",
        ]
        if data_dir is not None:
            arguments += ["--data-dir", str(data_dir)]
        log_dir = self.options.work_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        broker = BrokerLauncher(arguments, log_dir)
        broker.start()
        self.broker = broker
        return broker

    def consumer_settings(self) -> dict[str, Any]:
        return {
            "entity": ENTITY,
            "max_concurrent_sessions": 4,
            "session_idle_timeout_s": 0.5,
            "accept_timeout_s": 1.0,
            "max_delivery_count": MAX_DELIVERY_COUNT,
            "retry_attempts": 2,
            "retry_backoff_s": 0.05,
            "retry_max_backoff_s": 0.2,
            "handler_timeout_s": 10.0,
            "shutdown_grace_s": 2.0,
            "max_disconnected_s": 60.0,
            "checkpoint": self.plan.checkpoint,
            "poison_policy": "park",
            "store_path": str(self.options.work_dir / "projection.sqlite3"),
            "log_level": "debug",
            "metrics_port": 0,
        }

    def build_pool(self, proxy_port: int) -> ConsumerPool:
        work_dir = self.options.work_dir
        journal_dir = work_dir / "journal"
        log_dir = work_dir / "logs"
        journal_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        config_path = work_dir / "consumer.json"
        write_consumer_config(
            config_path,
            self.consumer_settings(),
            journal_dir,
            self.plan.handler_faults.to_document(),
        )
        connection_string = local_connection_string("127.0.0.1", proxy_port)
        slots = [
            ConsumerProcess(slot, config_path, log_dir, connection_string)
            for slot in range(self.options.consumers)
        ]
        self.pool = ConsumerPool(slots)
        return self.pool

    # Faults --------------------------------------------------------------------------

    def record(
        self,
        kind: str,
        detail: str,
        began_at: float | None = None,
        pid: int | None = None,
    ) -> None:
        """Record a fault that began at `began_at` (default now) and is over now.

        `pid` names the consumer process the fault hit, None when it hit them all.
        """
        now = time.time()
        at = now if began_at is None else began_at
        fault = InjectedFault(at=at, kind=kind, detail=detail, until=now, pid=pid)
        self.faults.append(fault)
        self.log(
            f"{at - self.started_at:7.1f}s {kind}: {detail} "
            f"(at {at:.3f}, {now - at:.1f}s long)"
        )

    async def inject(self, fault: PlannedFault) -> None:
        assert self.pool is not None and self.proxy is not None
        if fault.kind is FaultKind.CUT_CONNECTIONS:
            cut = self.proxy.cut()
            self.record(fault.kind, f"{cut} connections")
        elif fault.kind is FaultKind.RESTART_BROKER:
            await self.restart_broker(fault.hard)
        elif fault.kind in (
            FaultKind.BROKER_CUT_CONNECTIONS,
            FaultKind.EXPIRE_SESSION_LOCKS,
        ):
            await self.broker_fault(fault)
        else:
            await self.stop_consumer(fault)

    async def broker_fault(self, fault: PlannedFault) -> None:
        """Make the broker cut connections or expire session locks at once.

        A hard cut resets every client connection and a soft one those with a link
        on the run's entity. Both reach the publisher's connection while it sends.
        """
        broker = self.broker
        assert broker is not None
        began_at = time.time()
        try:
            if fault.kind is FaultKind.BROKER_CUT_CONNECTIONS:
                entity = None if fault.hard else ENTITY
                cut = await asyncio.to_thread(broker.cut_connections, entity)
                detail = f"{cut} connections of {entity or 'every entity'}"
            else:
                expired = await asyncio.to_thread(broker.expire_session_locks, ENTITY)
                detail = f"{len(expired)} sessions"
        except AdminError as error:
            self.notes.append(f"skipped {fault.kind}: {error}")
            return
        self.record(fault.kind, detail, began_at)

    async def stop_consumer(self, fault: PlannedFault) -> None:
        assert self.pool is not None
        slot = self.pool.slots[fault.target]
        if not slot.running or slot.slot in self.restarting:
            self.notes.append(f"skipped {fault.kind} of slot {slot.slot}: not running")
            return
        self.restarting.add(slot.slot)
        pid = slot.process.pid if slot.process is not None else 0
        if fault.kind is FaultKind.KILL_CONSUMER:
            slot.kill()
            self.record(fault.kind, f"slot {slot.slot} pid {pid}", pid=pid)
        else:
            # The fault lasts from the signal until the process is gone.
            began_at = time.time()
            code = await asyncio.to_thread(slot.terminate)
            self.record(fault.kind, f"slot {slot.slot} pid {pid}", began_at, pid)
            if code != 0:
                self.notes.append(f"pid {pid} exited with {code} after SIGTERM")
        await asyncio.sleep(fault.restart_after_s)
        slot.start()
        self.restarting.discard(slot.slot)

    async def restart_broker(self, hard: bool) -> None:
        broker = self.broker
        assert broker is not None
        # The fault lasts from the signal until the new broker listens.
        began_at = time.time()
        if hard:
            await asyncio.to_thread(broker.kill)
        else:
            await asyncio.to_thread(broker.terminate)
        await asyncio.to_thread(broker.start)
        self.record("restart_broker", "SIGKILL" if hard else "SIGTERM", began_at)

    async def run_faults(self) -> None:
        for fault in self.plan.faults:
            await self.sleep_until(fault.at_s)
            await self.inject(fault)

    async def monitor_consumers(self) -> None:
        """Restart a consumer that exited without a planned fault, and record it."""
        assert self.pool is not None
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            for slot in self.pool.slots:
                if slot.running or slot.slot in self.restarting:
                    continue
                code = slot.exit_code()
                pid = slot.process.pid if slot.process is not None else None
                self.record(
                    "consumer_exited",
                    f"slot {slot.slot} pid {pid} exit status {code}",
                    pid=pid,
                )
                slot.start()

    # Publishing ----------------------------------------------------------------------

    async def sleep_until(self, at_s: float) -> None:
        delay_s = self.started_at + at_s - time.time()
        if delay_s > 0:
            await asyncio.sleep(delay_s)

    async def publish(self) -> None:
        assert self.broker is not None
        settings = load_settings(
            "dev",
            connection_string=self.broker.connection_string,
            entity=ENTITY,
        )
        messages = self.plan.messages
        chunks = [
            messages[start : start + CHUNK_MESSAGES]
            for start in range(0, len(messages), CHUNK_MESSAGES)
        ]
        window_s = self.options.duration_s * PUBLISH_WINDOW
        for number, chunk in enumerate(chunks):
            await self.sleep_until(window_s * number / len(chunks))
            await self.send_chunk(settings, chunk)

    async def send_chunk(self, settings: Any, chunk: Any) -> None:
        built = [build_message(m.event, message_id=m.message_id) for m in chunk]
        give_up_at = time.time() + PUBLISH_GIVE_UP_S
        retry = SendRetryPolicy(attempts=1)
        while True:
            try:
                await publish_messages(settings, built, retry=retry)
                return
            except TransportError as error:
                # The broker may have stored the batch before the error, so a
                # retry can add second copies of these messages.
                self.resent.update(m.message_id for m in chunk)
                if time.time() > give_up_at:
                    self.unsent.update(m.message_id for m in chunk)
                    self.notes.append(f"gave up a chunk of {len(chunk)}: {error}")
                    return
                await asyncio.sleep(0.5)

    # Draining and judging ------------------------------------------------------------

    def expected_handled(self) -> set[str]:
        """Message ids that end handled when nothing goes wrong: all but parked ones."""
        poison = self.plan.handler_faults.poison
        expected: set[str] = set()
        parked_orders: set[str] = set()
        for message in self.plan.messages:
            if message.message_id in poison:
                parked_orders.add(message.order_id)
            elif message.order_id not in parked_orders:
                expected.add(message.message_id)
        return expected

    async def wait_until_drained(self) -> None:
        """Wait until every expected message is journaled, or the journal is quiet."""
        journal_dir = self.options.work_dir / "journal"
        expected = self.expected_handled()
        deadline = time.time() + self.options.max_drain_s
        last_count, quiet_since = -1, time.time()
        while time.time() < deadline:
            entries = read_journal(journal_dir)
            handled = {entry.message_id for entry in entries}
            if expected <= handled:
                # Leave time for the last settlements to reach the broker.
                await asyncio.sleep(2.0)
                return
            if len(entries) != last_count:
                last_count, quiet_since = len(entries), time.time()
            elif time.time() - quiet_since > self.options.settle_s:
                self.notes.append(
                    f"journal quiet for {self.options.settle_s}s with "
                    f"{len(expected - handled)} expected messages unhandled"
                )
                return
            await asyncio.sleep(1.0)
        self.notes.append(f"drain did not finish in {self.options.max_drain_s}s")

    def record_lock_expiries(self) -> None:
        """Record the session locks the broker expired by itself, from its logs.

        Each one is a fault of its own order: the consumer that held the lock did
        not renew it in time, which happens when the machine is overloaded.
        """
        for log_path in sorted((self.options.work_dir / "logs").glob("broker-*.log")):
            text = log_path.read_text(encoding="utf-8", errors="replace")
            for order_id, at_ms in LOCK_EXPIRED_LINE.findall(text):
                at = int(at_ms) / 1000
                self.faults.append(
                    InjectedFault(
                        at=at,
                        kind="lock_expired",
                        detail=f"order {order_id}",
                        until=at,
                        order_id=order_id,
                    )
                )

    async def judge(self) -> Verdict:
        assert self.broker is not None
        connection_string = self.broker.connection_string
        dead_letters = await read_dead_letters(connection_string, ENTITY)
        order_ids = sorted({message.order_id for message in self.plan.messages})
        sessions = await read_sessions(connection_string, ENTITY, order_ids)
        journal = read_journal(self.options.work_dir / "journal")
        sent = [m for m in self.plan.messages if m.message_id not in self.unsent]
        return judge(
            sent,
            frozenset(self.resent),
            journal,
            dead_letters,
            sessions,
            self.faults,
            checkpoint=self.plan.checkpoint,
        )


async def run_chaos(
    options: RunOptions, log: Callable[[str], None] = lambda line: None
) -> ChaosReport:
    """Run one chaos run and return its report; every process is stopped on return."""
    run = ChaosRun(options, log)
    options.work_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        broker = await asyncio.to_thread(run.start_broker)
        stack.callback(broker.terminate)
        proxy = ConnectionCutter(broker.port)
        await proxy.start()
        run.proxy = proxy
        stack.push_async_callback(proxy.close)
        pool = run.build_pool(proxy.port)
        stack.callback(pool.kill_all)
        for slot in pool.slots:
            slot.start()
        log(
            f"seed {options.seed}: {len(run.plan.messages)} messages, "
            f"{len(run.plan.faults)} faults, checkpoint={run.plan.checkpoint}, "
            f"durable broker={run.durable}"
        )
        monitor = asyncio.create_task(run.monitor_consumers())
        try:
            await asyncio.gather(run.publish(), run.run_faults())
            await run.wait_until_drained()
        finally:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        exits = await asyncio.to_thread(pool.stop_all)
        run.notes.extend(
            f"slot {slot} exited with {code} at the end"
            for slot, code in exits.items()
            if code != 0
        )
        run.record_lock_expiries()
        verdict = await run.judge()
    return ChaosReport(
        seed=options.seed,
        checkpoint=run.plan.checkpoint,
        broker_durable=run.durable,
        faults_by_kind=dict(_count_kinds(run.faults)),
        unsent=len(run.unsent),
        resent=len(run.resent),
        verdict=verdict,
        elapsed_s=time.time() - run.started_at,
        notes=run.notes,
    )


def _count_kinds(faults: list[InjectedFault]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for fault in faults:
        counts[fault.kind] = counts.get(fault.kind, 0) + 1
    return counts
