"""Measures against the local broker: throughput, turnover, scaling and latency.

Each measure runs our consumer and the baseline on the same workload, one after the
other, each on a fresh entity, with the same concurrency, prefetch, handler and idle
timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bench.measures.common import BenchContext, rate, ratio, run_child
from bench.worker import WorkerSpec
from bench.workload import order_messages

KINDS = ("ours", "baseline")
SCALING_HANDLER_S = 0.020
LATENCY_EVENTS_PER_ORDER = 10
LATENCY_CONCURRENCY = 32


@dataclass(frozen=True)
class Workload:
    """Orders and events per order, and how the consumer under test is configured."""

    orders: int
    events_per_order: int
    concurrency: int
    handler_delay_s: float = 0.0
    checkpoint: bool = True

    @property
    def messages(self) -> int:
        """Number of messages the workload publishes."""
        return self.orders * self.events_per_order


async def run_pair(
    context: BenchContext, workload: Workload, profile: str | None = None
) -> dict[str, dict[str, Any]]:
    """Run ours, then the baseline, on a preloaded `workload` and return the results.

    With `profile` and a profile folder in the context, our consumer then runs the
    workload once more under pyinstrument and writes the profile to that file name.
    The profiled run is not part of the figures, because the profiler slows it down.
    """
    results: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        results[kind] = await _run_one(context, workload, kind)
    if profile and context.profile_dir is not None:
        profile_path = str(context.profile_dir / profile)
        await _run_one(context, workload, "ours", profile_path)
    return results


async def _run_one(
    context: BenchContext,
    workload: Workload,
    kind: str,
    profile_path: str | None = None,
) -> dict[str, Any]:
    entity = context.next_entity()
    spec = WorkerSpec(
        kind=kind,
        entity=entity,
        expected=workload.messages,
        concurrency=workload.concurrency,
        idle_timeout_s=context.sizes.idle_timeout_s,
        handler_delay_s=workload.handler_delay_s,
        profile_path=profile_path,
        checkpoint=workload.checkpoint,
    )
    messages = order_messages(workload.orders, workload.events_per_order, entity)
    return await run_child(context, spec, preload=messages)


def _summary(result: dict[str, Any], orders: int) -> dict[str, Any]:
    messages = result["messages"]
    elapsed_s = result["elapsed_s"]
    return {
        **_shutdown(result),
        "messages": messages,
        "elapsed_s": elapsed_s,
        "messages_per_s": rate(messages, elapsed_s),
        "orders_per_s": rate(orders, elapsed_s),
        "cpu_s_per_1000": rate(result["cpu_s"] * 1000, messages),
        "broker_cpu_s_per_1000": rate(result["broker_cpu_s"] * 1000, messages),
    }


async def measure_throughput(context: BenchContext) -> dict[str, Any]:
    """Measure messages/s and consumer CPU per 1,000 messages with a no-op handler."""
    sizes = context.sizes
    figures: dict[str, Any] = {}
    for concurrency in sizes.throughput_levels:
        workload = Workload(
            sizes.throughput_orders, sizes.throughput_events, concurrency
        )
        profile = f"consumer-throughput-{concurrency}.txt"
        pair = await run_pair(context, workload, profile=profile)
        ours = _summary(pair["ours"], workload.orders)
        baseline = _summary(pair["baseline"], workload.orders)
        # The checkpoint costs a session-state write per message, which the
        # baseline does not make, so ours also runs once without it.
        unchecked = replace(workload, checkpoint=False)
        without = _summary(await _run_one(context, unchecked, "ours"), workload.orders)
        figures[str(concurrency)] = {
            "orders": workload.orders,
            "events_per_order": workload.events_per_order,
            "ours": ours,
            "baseline": baseline,
            "ratio": ratio(ours["messages_per_s"], baseline["messages_per_s"]),
            "ours_without_checkpoint": without,
            "ratio_without_checkpoint": ratio(
                without["messages_per_s"], baseline["messages_per_s"]
            ),
        }
    return figures


def _shutdown(result: dict[str, Any]) -> dict[str, Any]:
    """Return how the consumer stopped once its last message was completed."""
    shutdown: dict[str, Any] = {
        "stop_s": result["stop_s"],
        "stop_timed_out": result["stop_timed_out"],
    }
    if "stop_error" in result:
        shutdown["stop_error"] = result["stop_error"]
    return shutdown


def _breakdown(result: dict[str, Any]) -> dict[str, float]:
    """Return seconds per session by phase. Phases of different sessions overlap."""
    times = result["times"]
    sessions = max(1, int(times["sessions"]))
    per_session = {
        name.removesuffix("_s") + "_s_per_session": value / sessions
        for name, value in times.items()
        if name != "sessions"
    }
    per_session["broker_cpu_s_per_session"] = result["broker_cpu_s"] / sessions
    per_session["sessions"] = sessions
    return per_session


async def measure_turnover(context: BenchContext) -> dict[str, Any]:
    """Measure orders completed per second for single-event and three-event orders."""
    sizes = context.sizes
    figures: dict[str, Any] = {}
    for events in sizes.turnover_events:
        workload = Workload(sizes.turnover_orders, events, sizes.turnover_concurrency)
        pair = await run_pair(context, workload)
        ours = _summary(pair["ours"], workload.orders)
        baseline = _summary(pair["baseline"], workload.orders)
        figures[f"{events}_event"] = {
            "orders": workload.orders,
            "events_per_order": events,
            "concurrency": workload.concurrency,
            "ours": {**ours, "breakdown": _breakdown(pair["ours"])},
            "baseline": {**baseline, "breakdown": _breakdown(pair["baseline"])},
            "ratio": ratio(ours["orders_per_s"], baseline["orders_per_s"]),
        }
    return figures


async def measure_scaling(context: BenchContext) -> dict[str, Any]:
    """Measure messages per second with a 20 ms handler at each concurrency level."""
    sizes = context.sizes
    figures: dict[str, Any] = {}
    for concurrency in sizes.scaling_levels:
        orders = max(2 * concurrency, sizes.scaling_min_orders)
        workload = Workload(
            orders, sizes.scaling_events, concurrency, SCALING_HANDLER_S
        )
        pair = await run_pair(context, workload)
        figures[str(concurrency)] = {
            "orders": orders,
            "events_per_order": sizes.scaling_events,
            "ours": _summary(pair["ours"], orders),
            "baseline": _summary(pair["baseline"], orders),
        }
    lowest = figures[str(sizes.scaling_levels[0])]
    for level in figures.values():
        for kind in KINDS:
            single = lowest[kind]["messages_per_s"]
            level[kind]["over_lowest"] = ratio(level[kind]["messages_per_s"], single)
    return figures


async def measure_latency(context: BenchContext, max_rate: float) -> dict[str, Any]:
    """Measure enqueue-to-completion p50 and p99 at half of `max_rate` messages/s."""
    target_rate = max(1.0, max_rate / 2)
    messages_count = max(
        LATENCY_EVENTS_PER_ORDER,
        int(target_rate * context.sizes.latency_duration_s),
    )
    orders = max(1, messages_count // LATENCY_EVENTS_PER_ORDER)
    figures: dict[str, Any] = {"target_rate": target_rate, "orders": orders}
    for kind in KINDS:
        entity = context.next_entity()
        messages = order_messages(orders, LATENCY_EVENTS_PER_ORDER, entity)
        spec = WorkerSpec(
            kind=kind,
            entity=entity,
            expected=len(messages),
            concurrency=LATENCY_CONCURRENCY,
            idle_timeout_s=context.sizes.idle_timeout_s,
            record_latency=True,
        )
        result = await run_child(context, spec, steady=messages, rate_per_s=target_rate)
        figures[kind] = {
            **_shutdown(result),
            "messages": result["messages"],
            "published_rate": result["published_rate"],
            "p50_ms": result["latency_p50_ms"],
            "p99_ms": result["latency_p99_ms"],
        }
    return figures
