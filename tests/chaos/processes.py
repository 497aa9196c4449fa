"""Consumer processes of a chaos run: start, `kill -9`, SIGTERM and restart.

Every process started here is recorded, and `ConsumerPool.stop_all()` ends whatever is
still running, so a run that fails half-way leaves no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[2]
# A consumer drains within shutdown_grace_s; past this it is killed.
STOP_TIMEOUT_S = 15.0
# Time given to a hung process to print its task stacks before it is killed.
STACK_DUMP_WAIT_S = 1.0


@dataclass
class ConsumerProcess:
    """One consumer slot; each start runs a new process with a new pid."""

    slot: int
    config_path: Path
    log_dir: Path
    connection_string: str
    process: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)

    def start(self) -> int:
        """Start a new consumer process in this slot and return its pid."""
        environment = dict(os.environ)
        environment["ORDERS_CONSUMER_CONNECTION_STRING"] = self.connection_string
        # The variables below would otherwise override the harness settings.
        environment.pop("ORDERS_CONSUMER_ENV", None)
        environment.pop("ORDERS_CONSUMER_CONFIG_DIR", None)
        log_path = self.log_dir / f"consumer-{self.slot}-{len(self.pids)}.log"
        with log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.chaos.consumer_main",
                    str(self.config_path),
                ],
                cwd=REPOSITORY,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self.pids.append(self.process.pid)
        return self.process.pid

    @property
    def running(self) -> bool:
        """Whether the current process of this slot is alive."""
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        """Exit status of the current process, None while it runs."""
        return None if self.process is None else self.process.poll()

    def kill(self) -> None:
        """Stop the process with SIGKILL, as a crash or an OOM kill would."""
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait()

    def terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Send SIGTERM and wait for the drain; kill it past `timeout_s`.

        Return the exit status, or None when it had to be killed.
        """
        if not self.running:
            return self.exit_code()
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.wait_or_kill(timeout_s)

    def wait_or_kill(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Wait for the process to exit; kill it past `timeout_s` and return None.

        Before the kill, SIGUSR1 makes the process print its asyncio task stacks
        into its log, to show where the stop hung.
        """
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGUSR1)
            time.sleep(STACK_DUMP_WAIT_S)
            self.kill()
            return None


def write_consumer_config(
    path: Path, settings: dict[str, Any], journal_dir: Path, faults: dict[str, Any]
) -> None:
    """Write the JSON file a consumer process reads at start-up (no secrets in it)."""
    document = {"settings": settings, "journal_dir": str(journal_dir), "faults": faults}
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")


@dataclass
class ConsumerPool:
    """The consumer slots of a run."""

    slots: list[ConsumerProcess]

    def stop_all(self) -> dict[int, int | None]:
        """SIGTERM every running consumer at once, then wait; return exit statuses.

        Each process gets one signal only: a second SIGTERM that arrives after the app
        removed its signal handlers would end the process with the default action.
        """
        running = [slot for slot in self.slots if slot.running]
        for slot in running:
            assert slot.process is not None
            slot.process.send_signal(signal.SIGTERM)
        return {slot.slot: slot.wait_or_kill() for slot in running}

    def kill_all(self) -> None:
        """SIGKILL every consumer that still runs; used on the way out of a failure."""
        for slot in self.slots:
            slot.kill()
