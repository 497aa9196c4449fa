"""Profile the local broker under load from the benchmark's consumers.

    python bench/profile_broker.py [--out FILE] [--consumer-dir DIR]

Runs `python -m localbus` under pyinstrument on a free port of 127.0.0.1. The load is
the throughput run at 32 sessions and the single-event turnover run, at quick sizes,
ours and the baseline. SIGTERM then stops the broker, and pyinstrument writes its text
report. pyinstrument samples wall-clock time, so time the broker spends waiting in
`select` shows as well as the time it computes. With `--consumer-dir`, our consumer's
own profiles of those runs go there.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # Run as a script, Python puts bench/ on the path, not the repository root.
    sys.path.insert(0, str(ROOT))

from bench.measures.broker import Workload, run_pair  # noqa: E402
from bench.measures.common import QUICK, BenchContext, entity_names  # noqa: E402


def start_profiled_broker(out: Path) -> tuple[subprocess.Popen[str], str]:
    """Start the profiled broker and return the process and its connection string."""
    command = [sys.executable, "-m", "pyinstrument", "-r", "text", "--no-color"]
    command += ["-o", str(out), "-m", "localbus", "--host", "127.0.0.1", "--port", "0"]
    for name in entity_names():
        command += ["--entity", name]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=str(ROOT),
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("Endpoint=sb://127.0.0.1:"):
        process.kill()
        raise RuntimeError(
            f"the profiled broker did not start; exit status {process.poll()}"
        )
    return process, line


async def drive(context: BenchContext) -> None:
    """Run the loads whose broker side is profiled."""
    throughput = Workload(QUICK.throughput_orders, QUICK.throughput_events, 32)
    await run_pair(context, throughput, profile="consumer-throughput-32.txt")
    turnover = Workload(QUICK.turnover_orders, 1, QUICK.turnover_concurrency)
    await run_pair(context, turnover, profile="consumer-turnover-1.txt")


def main(argv: list[str] | None = None) -> int:
    """Profile the broker and write the report to `--out`."""
    parser = argparse.ArgumentParser(prog="python bench/profile_broker.py")
    parser.add_argument("--out", type=Path, default=Path("broker-profile.txt"))
    parser.add_argument(
        "--consumer-dir",
        type=Path,
        help="folder for our consumer's profiles of the same runs",
    )
    args = parser.parse_args(argv)
    if args.consumer_dir is not None:
        args.consumer_dir.mkdir(parents=True, exist_ok=True)
    process, connection = start_profiled_broker(args.out.resolve())
    try:
        context = BenchContext(
            connection_string=connection,
            broker_pid=process.pid,
            sizes=QUICK,
            entities=entity_names(),
            profile_dir=args.consumer_dir,
        )
        asyncio.run(drive(context))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    print(f"broker profile written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
