"""Records that a benchmark child process keeps while it consumes.

`Recorder` counts completed messages, and optionally their enqueue-to-completion
latency and the process RSS at given counts. `TimingTransport` wraps our consumer's
transport to add up the time spent accepting, receiving, waiting idle, settling and
closing sessions, so the two consumers report the same breakdown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import psutil

from consumer.transport import InboundMessage, SessionReceiver, Transport

T = TypeVar("T")
MIB = 1024 * 1024


@dataclass
class SessionTimes:
    """Seconds spent per phase, added up over every session of a run."""

    sessions: int = 0
    accept_s: float = 0.0
    receive_s: float = 0.0
    idle_s: float = 0.0
    settle_s: float = 0.0
    close_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """Return the totals by phase name, and the session count."""
        return {
            "sessions": self.sessions,
            "accept_s": self.accept_s,
            "receive_s": self.receive_s,
            "idle_s": self.idle_s,
            "settle_s": self.settle_s,
            "close_s": self.close_s,
        }


@dataclass
class Recorder:
    """Progress of one consumer run. `done` is set at `expected` completions."""

    expected: int
    record_latency: bool = False
    rss_at: frozenset[int] = frozenset()
    completed: int = 0
    latencies_s: list[float] = field(default_factory=list)
    rss_mb: dict[int, float] = field(default_factory=dict)
    times: SessionTimes = field(default_factory=SessionTimes)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    finished_at: float | None = None
    _process: psutil.Process = field(default_factory=psutil.Process)

    def message_completed(self, enqueued_at: datetime | None) -> None:
        """Count one completed message, recording its latency and the RSS if due."""
        self.completed += 1
        if self.record_latency and enqueued_at is not None:
            latency = datetime.now(UTC) - enqueued_at
            self.latencies_s.append(latency.total_seconds())
        if self.completed in self.rss_at:
            self.rss_mb[self.completed] = self._process.memory_info().rss / MIB
        if self.completed >= self.expected and not self.done.is_set():
            self.finished_at = time.perf_counter()
            self.done.set()


async def timed(operation: Awaitable[T]) -> tuple[T, float]:
    """Await `operation` and return its result with the seconds it took."""
    started = time.perf_counter()
    result = await operation
    return result, time.perf_counter() - started


class TimingReceiver:
    """A session receiver that adds its phase times to a `Recorder`."""

    def __init__(self, inner: SessionReceiver, recorder: Recorder) -> None:
        self._inner = inner
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        # Calls the benchmark does not time pass straight through.
        return getattr(self._inner, name)

    @property
    def session_id(self) -> str:
        """Id of the held session."""
        return self._inner.session_id

    @property
    def locked_until(self) -> datetime | None:
        """Expiry of the session lock, as the wrapped receiver reports it."""
        return self._inner.locked_until

    async def receive(self, max_wait_s: float) -> InboundMessage | None:
        """Receive like the wrapped receiver. An empty receive counts as idle wait."""
        message, seconds = await timed(self._inner.receive(max_wait_s))
        if message is None:
            self._recorder.times.idle_s += seconds
        else:
            self._recorder.times.receive_s += seconds
        return message

    async def complete(self, message: InboundMessage) -> None:
        """Complete the message and count it."""
        _, seconds = await timed(self._inner.complete(message))
        self._recorder.times.settle_s += seconds
        self._recorder.message_completed(message.enqueued_at)

    async def close(self) -> None:
        """Release the session."""
        _, seconds = await timed(self._inner.close())
        self._recorder.times.close_s += seconds


class TimingTransport:
    """A transport whose accepted sessions report their phase times."""

    def __init__(self, inner: Transport, recorder: Recorder) -> None:
        self._inner = inner
        self._recorder = recorder

    @property
    def entity(self) -> str:
        """Entity name of the wrapped transport."""
        return self._inner.entity

    async def accept_session(self, max_wait_s: float) -> TimingReceiver | None:
        """Accept like the wrapped transport. Only accepts that got a session count."""
        receiver, seconds = await timed(self._inner.accept_session(max_wait_s))
        if receiver is None:
            return None
        self._recorder.times.accept_s += seconds
        self._recorder.times.sessions += 1
        return TimingReceiver(receiver, self._recorder)

    async def close(self) -> None:
        """Close the wrapped transport."""
        await self._inner.close()


def percentile(values: Iterable[float], fraction: float) -> float:
    """Return the nearest-rank percentile of `values` (0.0 when empty)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[rank]
