"""Time-ordered queue of lock, TTL and schedule deadlines."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field


@dataclass(order=True, frozen=True)
class Deadline:
    """One pending deadline; `key` names the session or sequence number it guards."""

    at_ms: int
    order: int
    kind: str = field(compare=False)
    store: str = field(compare=False)
    key: object = field(compare=False)


class DeadlineQueue:
    """Min-heap of deadlines. Stale entries stay and are ignored when they fire."""

    def __init__(self) -> None:
        self._heap: list[Deadline] = []
        self._order = itertools.count()

    def add(self, at_ms: int, kind: str, store: str, key: object) -> None:
        """Schedule a deadline at epoch milliseconds `at_ms`."""
        heapq.heappush(self._heap, Deadline(at_ms, next(self._order), kind, store, key))

    def next_at_ms(self) -> int | None:
        """Return the earliest deadline, or None when there is none."""
        return self._heap[0].at_ms if self._heap else None

    def pop_due(self, now_ms: int) -> Deadline | None:
        """Remove and return the earliest deadline if it is due."""
        if self._heap and self._heap[0].at_ms <= now_ms:
            return heapq.heappop(self._heap)
        return None
