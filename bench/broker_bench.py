"""Measure the local broker with the azure-servicebus SDK as the client.

Starts `python -m localbus` on a free 127.0.0.1 port (or in-process with
--in-process) and prints, for one sync SDK client:

- send: messages/s for single-message sends and for batched sends,
- receive+complete: messages/s through one session, peek-lock, one complete each,
- session turnover: sessions accepted, drained of one message and released per second.

Usage: .venv/bin/python bench/broker_bench.py [--messages 2000] [--sessions 20]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusClient, ServiceBusMessage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localbus.testing import run_broker, run_broker_process  # noqa: E402

QUEUE = "bench.events"
BATCH_SIZE = 100


@contextlib.contextmanager
def broker_connection(in_process: bool) -> Iterator[str]:
    """Start a broker and yield its connection string."""
    runner = run_broker if in_process else run_broker_process
    with runner(entities=[QUEUE], lock_duration_s=60) as broker:
        yield broker.connection_string


def bench_send(client: ServiceBusClient, count: int) -> tuple[float, float]:
    """Return messages/s for single sends and for batches of BATCH_SIZE."""
    with client.get_queue_sender(QUEUE) as sender:
        started = time.perf_counter()
        for index in range(count):
            sender.send_messages(
                ServiceBusMessage(f"single-{index}", session_id="send")
            )
        single_rate = count / (time.perf_counter() - started)
        started = time.perf_counter()
        for first in range(0, count, BATCH_SIZE):
            batch = [
                ServiceBusMessage(f"batch-{index}", session_id="send")
                for index in range(first, min(first + BATCH_SIZE, count))
            ]
            sender.send_messages(batch)
        batch_rate = count / (time.perf_counter() - started)
    return single_rate, batch_rate


def bench_receive(client: ServiceBusClient, count: int) -> float:
    """Return messages/s received and completed through the session `send`."""
    received = 0
    with client.get_queue_receiver(QUEUE, session_id="send", max_wait_time=5) as rx:
        started = time.perf_counter()
        while received < count:
            batch = rx.receive_messages(max_message_count=BATCH_SIZE, max_wait_time=5)
            if not batch:
                raise RuntimeError(f"only {received} of {count} messages arrived")
            for message in batch:
                rx.complete_message(message)
            received += len(batch)
        return received / (time.perf_counter() - started)


def bench_turnover(client: ServiceBusClient, sessions: int) -> float:
    """Return sessions/s accepted, drained of one message and released."""
    with client.get_queue_sender(QUEUE) as sender:
        sender.send_messages(
            [ServiceBusMessage("turn", session_id=f"turn-{n}") for n in range(sessions)]
        )
    started = time.perf_counter()
    for _ in range(sessions):
        with client.get_queue_receiver(
            QUEUE, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=5
        ) as receiver:
            (message,) = receiver.receive_messages(max_wait_time=5)
            receiver.complete_message(message)
    return sessions / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    """Run the three measurements and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument(
        "--in-process", action="store_true", help="run the broker on a thread"
    )
    args = parser.parse_args(argv)
    with broker_connection(args.in_process) as connection_string:
        with ServiceBusClient.from_connection_string(connection_string) as client:
            single, batched = bench_send(client, args.messages)
            receive = bench_receive(client, 2 * args.messages)
            turnover = bench_turnover(client, args.sessions)
    where = "in-process" if args.in_process else "subprocess"
    print(f"broker: {where}, client: azure-servicebus sync, one connection per handler")
    print(f"send, single messages:        {single:8.0f} messages/s")
    print(f"send, batches of {BATCH_SIZE}:         {batched:8.0f} messages/s")
    print(f"receive+complete, one session: {receive:8.0f} messages/s")
    print(f"session turnover:              {turnover:8.1f} sessions/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
