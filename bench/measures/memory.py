"""Memory: the consumer's RSS after a first and a last count of handled messages.

The consumer runs in a child process against the local broker with every message
published beforehand, and samples its own RSS (psutil) when the completed count
reaches each checkpoint. Growth between the two samples is what a leak per message
or per session would show.

Run this measure alone from the repository root, at `--quick` or full size:

    python -m bench.measures.memory [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.measures.common import (
    FULL,
    QUICK,
    BenchContext,
    Sizes,
    entity_names,
    run_child,
)
from bench.report import memory_table
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


def run_alone(sizes: Sizes) -> dict[str, Any]:
    """Start the broker subprocess, run only the memory measure and return it."""
    from localbus.testing import run_broker_process

    started = time.perf_counter()
    with run_broker_process(entities=entity_names(1)) as broker:
        context = BenchContext(
            connection_string=broker.connection_string,
            broker_pid=broker.pid,
            sizes=sizes,
            entities=entity_names(1),
        )
        figures = asyncio.run(measure_memory(context))
    figures["duration_s"] = time.perf_counter() - started
    return figures


def main(argv: list[str] | None = None) -> int:
    """Run the memory measure from the command line and print its table."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.measures.memory",
        description="Measure the consumer's RSS growth on the local broker.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="use the --quick sizes of bench/run.py"
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    figures = run_alone(QUICK if args.quick else FULL)
    print(memory_table(figures).as_text())
    print(f"took {figures['duration_s']:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
