"""Memory: the consumer's RSS after a first and a last count of handled messages.

The consumer runs in a child process against the local broker with every message
published beforehand, and samples its own RSS (psutil) when the completed count
reaches each checkpoint. Growth between the two samples is what a leak per message
or per session would show.
"""

from __future__ import annotations

from typing import Any

from bench.measures.common import BenchContext, run_child
from bench.worker import WorkerSpec
from bench.workload import order_messages

CONCURRENCY = 32


async def measure_memory(context: BenchContext) -> dict[str, Any]:
    """Measure RSS in MiB at each checkpoint and the growth between them."""
    sizes = context.sizes
    first, last = sizes.memory_checkpoints
    orders = sizes.memory_orders
    events = max(1, last // orders)
    entity = context.next_entity()
    messages = order_messages(orders, events, entity)
    spec = WorkerSpec(
        kind="ours",
        entity=entity,
        expected=len(messages),
        concurrency=CONCURRENCY,
        idle_timeout_s=sizes.idle_timeout_s,
        rss_at=(first, last),
    )
    result = await run_child(context, spec, preload=messages)
    rss = result["rss_mb"]
    first_mb = rss.get(str(first), 0.0)
    last_mb = rss.get(str(last), 0.0)
    return {
        "orders": orders,
        "events_per_order": events,
        "concurrency": CONCURRENCY,
        "rss_mb": rss,
        "first_messages": first,
        "last_messages": last,
        "growth_mb": last_mb - first_mb,
        "elapsed_s": result["elapsed_s"],
    }
