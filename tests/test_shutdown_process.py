"""Stopping an `orders-consumer run` process: exit codes, time bound, no lost message.

Each test starts the real command as a subprocess against a local broker subprocess
on 127.0.0.1 and sends it a signal, as Kubernetes does on a rollout.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusSubQueue
from azure.servicebus.aio import ServiceBusClient
from azure.servicebus.exceptions import OperationTimeoutError
from prometheus_client.parser import text_string_to_metric_families

from consumer.app import SHUTDOWN_MARGIN_S
from consumer.cli import EXIT_CONFIGURATION, EXIT_FAILED, _start_exit_watchdog
from consumer.config import local_connection_string
from consumer.generate import generate_stream
from handlers.store import ProjectionStore
from localbus.testing import BrokerProcess, run_broker_process
from tests.conftest import QUEUE, Outgoing, consumer_environment, numbered, publish

GRACE_S = 2.0
# Starting the interpreter and importing the SDK is not part of the bound, but
# reading the exit status of a process on a busy 2-core machine can lag.
EXIT_STATUS_LAG_S = 1.0
START_TIMEOUT_S = 60.0


class ConsumerProcess:
    """An `orders-consumer run` subprocess whose JSON log lines are collected."""

    def __init__(self, work_dir: Path, settings: dict[str, Any]) -> None:
        self.lines: list[dict[str, Any]] = []
        self.output: list[str] = []
        self._process = subprocess.Popen(
            [*consumer_command(), "run", "--env", "dev"],
            cwd=work_dir,
            env=consumer_environment(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self.output.append(line)
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                continue

    def events(self, name: str) -> list[dict[str, Any]]:
        """Return the log lines whose `event` is `name`."""
        return [line for line in list(self.lines) if line.get("event") == name]

    def metrics_url(self) -> str:
        """Wait for the operations server and return its `/metrics` URL."""
        wait_until(lambda: self.events("ops_server_started"), self, "ops server")
        port = self.events("ops_server_started")[0]["port"]
        return f"http://127.0.0.1:{port}/metrics"

    def signal(self, number: int) -> None:
        """Send signal `number` to the process."""
        self._process.send_signal(number)

    def wait(self, timeout_s: float) -> int:
        """Wait for the exit and return the exit status."""
        status = self._process.wait(timeout=timeout_s)
        self._reader.join(timeout=5)
        return status

    def kill(self) -> None:
        """Kill the process if it still runs, and close its output pipe."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._reader.join(timeout=5)
        if self._process.stdout is not None:
            self._process.stdout.close()

    def log_tail(self, count: int = 40) -> str:
        """Return the last `count` output lines, for assertion messages."""
        return "".join(self.output[-count:])


def consumer_command() -> list[str]:
    """Return the `orders-consumer` script of this environment."""
    script = Path(sys.executable).parent / "orders-consumer"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "consumer.cli"]


def base_settings(connection_string: str, work_dir: Path) -> dict[str, Any]:
    """Return settings for a consumer process on `QUEUE`, logging JSON at debug."""
    return {
        "connection_string": connection_string,
        "entity": QUEUE,
        "store_path": str(work_dir / "orders.sqlite3"),
        "metrics_port": 0,
        "log_format": "json",
        "log_level": "debug",
        "session_idle_timeout_s": 0.3,
        "shutdown_grace_s": GRACE_S,
    }


def wait_until(
    condition: Any, process: ConsumerProcess, what: str, timeout_s: float = 60.0
) -> None:
    """Poll `condition()` until it is true, failing with the consumer's log."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{process.log_tail()}")
        time.sleep(0.05)


def read_metrics(url: str) -> dict[str, float]:
    """Return every sample of `/metrics`, labels dropped, summed by sample name."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode("utf-8")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def applied_message_ids(store_path: Path) -> list[str]:
    """Return the message ids the bundled handlers applied to the store."""
    connection = sqlite3.connect(store_path, timeout=30)
    try:
        rows = connection.execute("SELECT message_id FROM applied_message").fetchall()
    finally:
        connection.close()
    return [row[0] for row in rows]


async def receive_all(connection_string: str) -> list[str]:
    """Complete every message left in `QUEUE` and return their ids.

    A session that stays locked is skipped after one `max_wait_time`, so its
    messages are missing from the result.
    """
    found: list[str] = []
    async with ServiceBusClient.from_connection_string(connection_string) as client:
        while True:
            receiver = client.get_queue_receiver(
                QUEUE, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=1.0
            )
            try:
                await receiver.__aenter__()
                # A next-available accept that timed out can report an open link
                # without a session, as `AzureTransport.accept_session` notes.
                if not isinstance(receiver.session.session_id, str):
                    return found
                while batch := await receiver.receive_messages(20, max_wait_time=0.5):
                    for message in batch:
                        found.append(str(message.message_id))
                        await receiver.complete_message(message)
            except OperationTimeoutError:
                return found
            finally:
                await receiver.close()


async def dead_lettered_ids(connection_string: str) -> list[str]:
    """Return the ids of the messages in the dead-letter queue of `QUEUE`."""
    async with ServiceBusClient.from_connection_string(connection_string) as client:
        receiver = client.get_queue_receiver(
            QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=0.5
        )
        async with receiver:
            messages = await receiver.receive_messages(100, max_wait_time=0.5)
            return [str(message.message_id) for message in messages]


def orders_of(messages: list[Outgoing]) -> list[str]:
    """Return the order ids of `messages` in first-seen order."""
    return list(dict.fromkeys(message.session_id for message in messages))


@pytest.fixture
def broker_process() -> Iterator[BrokerProcess]:
    """A local broker subprocess with the session queue `QUEUE`."""
    with run_broker_process(entities=[QUEUE], lock_duration_s=5.0) as broker:
        yield broker


@pytest.fixture
def consumers() -> Iterator[list[ConsumerProcess]]:
    """Consumer processes started by a test, killed after it if still running."""
    started: list[ConsumerProcess] = []
    yield started
    for process in started:
        process.kill()


def test_sigterm_stops_within_grace(
    broker_process: BrokerProcess,
    consumers: list[ConsumerProcess],
    tmp_path: Path,
) -> None:
    connection_string = broker_process.connection_string
    messages = numbered(generate_stream(5, seed=11))
    orders = orders_of(messages)
    first = [message for message in messages if message.session_id in orders[:2]]
    second = [message for message in messages if message.session_id in orders[2:]]
    settings = base_settings(connection_string, tmp_path)
    # Two workers, room for three standby sessions, and accepts that wait far
    # longer than the grace period on an empty queue.
    settings.update(
        max_concurrent_sessions=2, standby_sessions=3, accept_timeout_s=30.0
    )
    store_path = Path(settings["store_path"])
    ProjectionStore(store_path).close()

    asyncio.run(publish(connection_string, first))
    consumer = ConsumerProcess(tmp_path, settings)
    consumers.append(consumer)
    metrics_url = consumer.metrics_url()
    wait_until(
        lambda: len(applied_message_ids(store_path)) == len(first),
        consumer,
        "the first orders to be handled",
    )

    # A write lock on the store blocks the bundled handlers in their threads, the
    # way a database outage would.
    blocker = sqlite3.connect(store_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        asyncio.run(publish(connection_string, second))

        def busy() -> bool:
            values = read_metrics(metrics_url)
            sessions_held = values.get("orders_consumer_sessions_held", 0)
            in_flight = values.get("orders_consumer_handlers_in_flight", 0)
            accepted = values.get("orders_consumer_sessions_accepted_total", 0)
            released = values.get("orders_consumer_sessions_released_total", 0)
            standby = accepted - released - sessions_held
            return sessions_held == 2 and in_flight == 2 and standby == 1

        wait_until(busy, consumer, "two handlers in flight and one standby session")
        consumer.signal(signal.SIGTERM)
        started = time.monotonic()
        status = consumer.wait(timeout_s=120)
        elapsed_s = time.monotonic() - started
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    print(f"SIGTERM to exit: {elapsed_s:.2f}s (shutdown_grace_s={GRACE_S})")

    assert status == 0, consumer.log_tail()
    assert elapsed_s <= GRACE_S + SHUTDOWN_MARGIN_S + EXIT_STATUS_LAG_S, (
        f"stopped in {elapsed_s:.2f}s\n{consumer.log_tail()}"
    )
    assert consumer.events("consumer_stopped")
    assert not consumer.events("processor_task_failed")
    assert not consumer.events("shutdown_timed_out")
    # The two handler threads still wait for the database lock.
    [abandoned] = consumer.events("handler_threads_abandoned")
    assert abandoned["threads"] == 2

    applied = applied_message_ids(store_path)
    remaining = asyncio.run(receive_all(connection_string))
    published = {message.message_id for message in messages}
    assert len(applied) == len(set(applied))
    assert len(remaining) == len(set(remaining))
    assert set(applied) == {message.message_id for message in first}
    assert set(applied).isdisjoint(remaining)
    assert set(applied) | set(remaining) == published
    assert asyncio.run(dead_lettered_ids(connection_string)) == []


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_0(
    number: int,
    broker_process: BrokerProcess,
    consumers: list[ConsumerProcess],
    tmp_path: Path,
) -> None:
    settings = base_settings(broker_process.connection_string, tmp_path)
    settings.update(accept_timeout_s=30.0)
    consumer = ConsumerProcess(tmp_path, settings)
    consumers.append(consumer)
    wait_until(lambda: consumer.events("consumer_started"), consumer, "start-up")

    consumer.signal(number)
    status = consumer.wait(timeout_s=60)

    assert status == 0, consumer.log_tail()
    assert consumer.events("consumer_stopped")


def free_port() -> int:
    """Return a port of 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_unreachable_broker_exits_1(
    consumers: list[ConsumerProcess], tmp_path: Path
) -> None:
    settings = base_settings(local_connection_string(port=free_port()), tmp_path)
    settings.update(max_disconnected_s=1.0, transport_retry_attempts=0)
    consumer = ConsumerProcess(tmp_path, settings)
    consumers.append(consumer)

    status = consumer.wait(timeout_s=60)

    assert status == EXIT_FAILED, consumer.log_tail()
    assert "max_disconnected_s=1.0" in "".join(consumer.output)


def test_invalid_setting_exits_2(
    consumers: list[ConsumerProcess], tmp_path: Path
) -> None:
    settings = base_settings(local_connection_string(port=free_port()), tmp_path)
    settings.update(shutdown_grace_s=-1)
    consumer = ConsumerProcess(tmp_path, settings)
    consumers.append(consumer)

    status = consumer.wait(timeout_s=60)

    assert status == EXIT_CONFIGURATION, consumer.log_tail()
    assert "shutdown_grace_s" in "".join(consumer.output)


def test_watchdog_exits_after_bound() -> None:
    exits: list[int] = []
    exited = threading.Event()

    def record_exit(code: int) -> None:
        exits.append(code)
        exited.set()

    app = SimpleNamespace(
        settings=SimpleNamespace(shutdown_grace_s=0.0),
        stop_requested_at=time.monotonic() - 60.0,
    )

    _start_exit_watchdog(app, exit_process=record_exit)

    assert exited.wait(timeout=30)
    assert exits == [0]
