"""Shared machinery of the broker measures: entities, sizes and child runs.

Each run gets an entity of its own, so no message of an earlier run is left in its
way. The broker runs in a separate process (`run_broker_process`) and the consumer
under test in another (`bench.worker`), so the CPU time each reports is its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from azure.servicebus import ServiceBusMessage

from bench.worker import CONNECTION_ENV, READY_LINE, WorkerSpec
from bench.workload import publish_all, publish_steadily

ROOT = Path(__file__).resolve().parents[2]
# Upper bound on one child run, so a stuck consumer fails the benchmark instead of
# hanging it. The full memory run is the longest, at a few minutes on 2 cores.
CHILD_TIMEOUT_S = 900.0
ENTITY_COUNT = 56


@dataclass(frozen=True)
class Sizes:
    """Workload sizes of one benchmark run (`--quick` or full)."""

    idle_timeout_s: float
    throughput_orders: int
    throughput_events: int
    turnover_orders: int
    scaling_events: int
    scaling_min_orders: int
    scaling_levels: tuple[int, ...]
    latency_duration_s: float
    memory_orders: int
    memory_checkpoints: tuple[int, int]
    overhead_orders: int
    overhead_events: int
    turnover_concurrency: int = 8
    turnover_events: tuple[int, ...] = (1, 3)
    throughput_levels: tuple[int, ...] = (1, 32)


QUICK = Sizes(
    idle_timeout_s=1.0,
    throughput_orders=12,
    throughput_events=50,
    turnover_orders=64,
    scaling_events=40,
    scaling_min_orders=8,
    scaling_levels=(1, 8, 32, 64),
    latency_duration_s=8.0,
    memory_orders=1_000,
    memory_checkpoints=(2_000, 10_000),
    overhead_orders=50,
    overhead_events=40,
)
FULL = Sizes(
    idle_timeout_s=1.0,
    throughput_orders=100,
    throughput_events=50,
    turnover_orders=1_000,
    scaling_events=100,
    scaling_min_orders=32,
    scaling_levels=(1, 8, 32, 64),
    latency_duration_s=30.0,
    memory_orders=5_000,
    memory_checkpoints=(10_000, 100_000),
    overhead_orders=100,
    overhead_events=100,
)
TINY = Sizes(
    idle_timeout_s=0.5,
    throughput_orders=2,
    throughput_events=5,
    turnover_orders=4,
    scaling_events=2,
    scaling_min_orders=2,
    scaling_levels=(1,),
    latency_duration_s=1.0,
    memory_orders=10,
    memory_checkpoints=(20, 60),
    overhead_orders=3,
    overhead_events=5,
    turnover_concurrency=2,
    turnover_events=(1,),
    throughput_levels=(1,),
)


@dataclass
class BenchContext:
    """The running broker, the entities not used yet, and where profiles go."""

    connection_string: str
    broker_pid: int | None
    sizes: Sizes
    entities: list[str] = field(default_factory=list)
    profile_dir: Path | None = None

    def next_entity(self) -> str:
        """Return an entity no earlier run used."""
        if not self.entities:
            raise RuntimeError(
                f"all {ENTITY_COUNT} benchmark entities are used; raise ENTITY_COUNT"
            )
        return self.entities.pop(0)


def entity_names(count: int = ENTITY_COUNT) -> list[str]:
    """Return the names of the session queues the benchmark broker creates."""
    return [f"bench.run{number:02d}" for number in range(count)]


def broker_cpu_s(pid: int | None) -> float:
    """Return the CPU seconds the broker process used so far (0.0 when in-process)."""
    if pid is None:
        return 0.0
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def run_child(
    context: BenchContext,
    spec: WorkerSpec,
    *,
    preload: Sequence[ServiceBusMessage] = (),
    steady: Sequence[ServiceBusMessage] = (),
    rate_per_s: float = 0.0,
) -> dict[str, Any]:
    """Publish `preload`, run `spec` in a child process and return its result.

    `steady` messages are published at `rate_per_s` while the child consumes. The
    result gains `broker_cpu_s`, the broker's CPU seconds while the child consumed.
    """
    connection = context.connection_string
    if preload:
        await publish_all(connection, spec.entity, preload)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.worker",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(ROOT),
        env={**os.environ, CONNECTION_ENV: connection},
    )
    try:
        return await asyncio.wait_for(
            _drive(context, process, spec, steady, rate_per_s), CHILD_TIMEOUT_S
        )
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _drive(
    context: BenchContext,
    process: asyncio.subprocess.Process,
    spec: WorkerSpec,
    steady: Sequence[ServiceBusMessage],
    rate_per_s: float,
) -> dict[str, Any]:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(json.dumps(asdict(spec)).encode("utf-8"))
    process.stdin.close()
    ready = await process.stdout.readline()
    cpu_before = broker_cpu_s(context.broker_pid)
    published_rate = 0.0
    if ready.decode().strip() == READY_LINE and steady:
        connection = context.connection_string
        published_rate = await publish_steadily(
            connection, spec.entity, steady, rate_per_s
        )
    line = await process.stdout.readline()
    cpu_after = broker_cpu_s(context.broker_pid)
    _, errors = await process.communicate()
    if process.returncode != 0 or not line.strip():
        raise RuntimeError(
            f"benchmark child ({spec.kind} on {spec.entity}) failed with exit status "
            f"{process.returncode}: {errors.decode(errors='replace')[-2000:]}"
        )
    result: dict[str, Any] = json.loads(line)
    result["broker_cpu_s"] = cpu_after - cpu_before
    result["published_rate"] = published_rate
    return result


def rate(count: float, seconds: float) -> float:
    """Return `count / seconds`, or 0.0 for a zero duration."""
    return count / seconds if seconds > 0 else 0.0


def ratio(ours: float, baseline: float) -> float:
    """Return `ours / baseline`, or 0.0 when the baseline is zero."""
    return ours / baseline if baseline else 0.0
