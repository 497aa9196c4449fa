"""Run the chaos harness by hand: `python tests/chaos/run.py --seed N --duration S`.

Prints each injected fault as it happens, then a summary, and exits 1 when the oracle
found a violation, 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
from pathlib import Path

# Run as a script, the first path entry is this folder. The repository root replaces
# it, so that `tests.chaos` can be imported and no module here shadows a standard one.
sys.path[0] = str(Path(__file__).resolve().parents[2])

from tests.chaos.harness import RunOptions, run_chaos  # noqa: E402
from tests.chaos.summary import render  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Describe the command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1, help="seed of stream and faults")
    parser.add_argument(
        "--duration", type=float, default=60.0, help="run time in seconds before drain"
    )
    parser.add_argument("--consumers", type=int, default=3, help="consumer processes")
    parser.add_argument(
        "--checkpoint",
        choices=["on", "off", "seed"],
        default="seed",
        help="the consumers' checkpoint setting; 'seed' lets the seed choose",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="folder for the broker data, journals and logs (default: a temporary one)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the harness with the options in `argv` and return the exit status."""
    args = build_parser().parse_args(argv)
    # SIGTERM ends the run like Ctrl-C, so the broker and the consumers are stopped
    # on the way out instead of outliving the harness.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    checkpoint = {"on": True, "off": False, "seed": None}[args.checkpoint]
    with tempfile.TemporaryDirectory(prefix="chaos-") as temporary:
        work_dir = args.work_dir or Path(temporary)
        options = RunOptions(
            seed=args.seed,
            duration_s=args.duration,
            work_dir=work_dir,
            consumers=args.consumers,
            checkpoint=checkpoint,
        )
        try:
            report = asyncio.run(
                run_chaos(options, log=lambda line: print(line, flush=True))
            )
        except KeyboardInterrupt:
            print("interrupted: every process of the run was stopped", flush=True)
            return 130
    print(render(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
