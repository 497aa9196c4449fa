"""The hand-written consumer that our framework is measured against.

It is the loop a Python team writes first with `azure.servicebus.aio`: a pool of
`concurrency` tasks, each opening a next-available session receiver, reading it until
no message came for `max_wait_time` (set to our session idle timeout), completing each
message after the handler returned, then closing the receiver and opening the next
one. Every task waits for its own open, idle wait and close before it serves another
session. It parses each body with the same validation as our consumer and calls the
same handler, so the two differ only in how sessions are scheduled and settled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusReceivedMessage
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver
from azure.servicebus.exceptions import (
    OperationTimeoutError,
    SessionCannotBeLockedError,
)

from bench.recorder import Recorder
from consumer.events import parse_event

Handler = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True)
class BaselineOptions:
    """The settings the baseline shares with the consumer under test."""

    entity: str
    concurrency: int
    prefetch_count: int
    idle_timeout_s: float


async def run_baseline(
    client: ServiceBusClient,
    options: BaselineOptions,
    handler: Handler,
    recorder: Recorder,
) -> None:
    """Run the receiver pool until `recorder.done` is set, then cancel it."""
    workers = [
        asyncio.create_task(_serve_sessions(client, options, handler, recorder))
        for _ in range(options.concurrency)
    ]
    try:
        await recorder.done.wait()
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


async def _serve_sessions(
    client: ServiceBusClient,
    options: BaselineOptions,
    handler: Handler,
    recorder: Recorder,
) -> None:
    while not recorder.done.is_set():
        started = time.perf_counter()
        receiver = client.get_queue_receiver(
            queue_name=options.entity,
            session_id=NEXT_AVAILABLE_SESSION,
            max_wait_time=options.idle_timeout_s,
            prefetch_count=options.prefetch_count,
        )
        try:
            await receiver.__aenter__()
        except (OperationTimeoutError, SessionCannotBeLockedError):
            await receiver.close()
            continue
        recorder.times.accept_s += time.perf_counter() - started
        recorder.times.sessions += 1
        try:
            await _read_until_idle(receiver, handler, recorder)
        finally:
            closing = time.perf_counter()
            await receiver.close()
            recorder.times.close_s += time.perf_counter() - closing


async def _read_until_idle(
    receiver: ServiceBusReceiver, handler: Handler, recorder: Recorder
) -> None:
    # The iterator ends once no message arrived for max_wait_time, so the time from
    # the last completion to its end is the idle wait.
    last = time.perf_counter()
    async for message in receiver:
        received = time.perf_counter()
        recorder.times.receive_s += received - last
        await handler(parse_event(_body(message)))
        settling = time.perf_counter()
        await receiver.complete_message(message)
        last = time.perf_counter()
        recorder.times.settle_s += last - settling
        recorder.message_completed(message.enqueued_time_utc)
    recorder.times.idle_s += time.perf_counter() - last


def _body(message: ServiceBusReceivedMessage) -> bytes:
    return b"".join(bytes(section) for section in message.body)
