"""Consumer processes of a chaos run: start, `kill -9`, SIGTERM and restart.

Every process started here is recorded, and `ConsumerPool.stop_all()` ends whatever is
still running, so a run that fails half-way leaves no process behind.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localbus.testing import admin_client

REPOSITORY = Path(__file__).resolve().parents[2]
# A stopped consumer that is not gone after this many seconds is killed.
STOP_TIMEOUT_S = 15.0
# Time a broker gets to print its connection string after it starts.
START_TIMEOUT_S = 15.0
# Time given to a hung process to print its task stacks before it is killed.
STACK_DUMP_WAIT_S = 1.0


@dataclass
class ConsumerProcess:
    """One consumer slot. Each start runs a new process with a new pid."""

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
        """Send SIGTERM and wait for the drain, killing the process past `timeout_s`.

        Return the exit status, or None when it had to be killed.
        """
        if not self.running:
            return self.exit_code()
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.wait_or_kill(timeout_s)

    def wait_or_kill(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Wait for the process to exit, or kill it past `timeout_s` and return None.

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
        """Send SIGTERM to every running consumer at once and return exit statuses.

        Each process gets one signal only: a second SIGTERM that arrives after the app
        removed its signal handlers would end the process with the default action.
        """
        running = [slot for slot in self.slots if slot.running]
        for slot in running:
            assert slot.process is not None
            slot.process.send_signal(signal.SIGTERM)
        return {slot.slot: slot.wait_or_kill() for slot in running}

    def kill_all(self) -> None:
        """Send SIGKILL to every consumer that still runs, after a failed run."""
        for slot in self.slots:
            slot.kill()


@dataclass
class BrokerLauncher:
    """`python -m localbus` with its log kept, restartable on the same port.

    `localbus.testing.BrokerProcess` discards the broker's standard error. A chaos run
    keeps it in `log_dir/broker-<n>.log`, one file per start, to explain failures.
    """

    arguments: list[str]
    log_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def connection_string(self) -> str:
        """Connection string of the broker, with the emulator's well-known key."""
        from consumer.config import local_connection_string

        return local_connection_string(self.host, self.port)

    def start(self) -> None:
        """Start the broker and wait until it prints its connection string."""
        log_path = self.log_dir / f"broker-{self.starts}.log"
        self.starts += 1
        with log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "localbus",
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                    *self.arguments,
                ],
                cwd=REPOSITORY,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
            )
        assert self.process.stdout is not None
        readable, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT_S)
        line = ""
        if readable:
            line = self.process.stdout.readline().decode("utf-8", "replace")
        marker = f"sb://{self.host}:"
        if marker not in line:
            self.kill()
            raise RuntimeError(f"the broker did not start; see {log_path}")
        self.port = int(line.split(marker, 1)[1].split(";", 1)[0])

    def cut_connections(self, entity: str | None = None) -> int:
        """Reset the broker's client connections, or those on `entity`; count them.

        Raises `localbus.admin_client.AdminError` when the broker does not respond.
        """
        with admin_client(self.host, self.port) as admin:
            return admin.cut_connections(entity)

    def expire_session_locks(self, entity: str | None = None) -> list[str]:
        """Expire the broker's held session locks now; return the session ids."""
        with admin_client(self.host, self.port) as admin:
            return admin.expire_session_locks(entity)

    def kill(self) -> None:
        """Stop the broker with SIGKILL, as a crash would."""
        self._stop(signal.SIGKILL)

    def terminate(self) -> None:
        """Stop the broker with SIGTERM and wait for it to exit."""
        self._stop(signal.SIGTERM)

    def _stop(self, signum: int) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signum)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
        self.process = None
