"""Benchmark our consumer against the hand-written baseline on the local broker.

    python bench/run.py [--quick] [--json FILE] [--docs]

Starts the local broker as a subprocess on a free port of 127.0.0.1, runs every
measure, prints one table per measure and optionally writes all figures as JSON. The
JSON leads with `turnover_ratio`, `throughput_ratio_1`, `throughput_ratio_32`,
`scaling_32_over_1`, `overhead_ratio` and `rss_growth_mb`. `--docs` also writes
the results section of `docs/benchmarks.md` and the plots under `docs/img/`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # Run as a script, Python puts bench/ on the path, not the repository root.
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.measures.broker import (  # noqa: E402
    measure_latency,
    measure_scaling,
    measure_throughput,
    measure_turnover,
)
from bench.measures.common import (  # noqa: E402
    FULL,
    QUICK,
    BenchContext,
    Sizes,
    entity_names,
)
from bench.measures.memory import measure_memory  # noqa: E402
from bench.measures.overhead import measure_overhead  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Describe the command-line options."""
    parser = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Measure the orders consumer against a hand-written session "
        "receiver pool on the local broker.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="run every measure at reduced sizes (a few minutes on 2 cores)",
    )
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument(
        "--docs",
        action="store_true",
        help="write the results into docs/benchmarks.md and plots into docs/img/",
    )
    parser.add_argument(
        "--profile-dir",
        type=Path,
        help="also run our consumer once per throughput level under pyinstrument "
        "and write its text profile into this folder",
    )
    return parser


async def run_measures(context: BenchContext, log: Any = print) -> dict[str, Any]:
    """Run every measure in turn and return their figures by measure name."""
    sizes = context.sizes
    figures: dict[str, Any] = {}
    log("measuring throughput")
    figures["throughput"] = await measure_throughput(context)
    log("measuring session turnover")
    figures["turnover"] = await measure_turnover(context)
    log("measuring concurrency scaling")
    figures["scaling"] = await measure_scaling(context)
    top = figures["throughput"][str(max(sizes.throughput_levels))]
    max_rate = top["ours"]["messages_per_s"]
    log("measuring latency")
    figures["latency"] = await measure_latency(context, max_rate)
    log("measuring framework overhead")
    figures["overhead"] = await measure_overhead(
        sizes.overhead_orders, sizes.overhead_events
    )
    log("measuring memory")
    figures["memory"] = await measure_memory(context)
    return figures


def run_benchmark(
    sizes: Sizes, profile_dir: Path | None = None, log: Any = print
) -> dict[str, Any]:
    """Start the broker subprocess, run every measure and return the JSON document."""
    from localbus.testing import run_broker_process

    started = time.perf_counter()
    with run_broker_process(entities=entity_names()) as broker:
        context = BenchContext(
            connection_string=broker.connection_string,
            broker_pid=broker.pid,
            sizes=sizes,
            entities=entity_names(),
            profile_dir=profile_dir,
        )
        figures = asyncio.run(run_measures(context, log))
    return {
        **report.summary_keys(figures),
        **figures,
        "broker": "subprocess (localbus.testing.run_broker_process)",
        "idle_timeout_s": sizes.idle_timeout_s,
        "machine": report.machine(),
        "duration_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line and print its tables."""
    args = build_parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.profile_dir is not None:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    document = run_benchmark(sizes, args.profile_dir, log=_progress)
    for table in report.all_tables(document):
        print()
        print(table.as_text())
    print()
    for problem in report.shutdown_problems(document):
        print(f"shutdown problem: {problem}")
    for key in report.SUMMARY_KEYS:
        print(f"{key} = {document[key]:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(document, indent=2), encoding="utf-8")
    if args.docs:
        from bench.docs import write_docs

        command = "python bench/run.py" + (" --quick" if args.quick else "")
        write_docs(document, command, ROOT / "docs")
    return 0


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
