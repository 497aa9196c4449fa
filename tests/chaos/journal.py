"""The journal of handled messages that every chaos consumer process appends to.

Each consumer process writes its own JSON lines file, `journal-<pid>.jsonl`, and flushes
every line, so a line that was written survives a `kill -9` of the process. The journal
handler runs after the bundled handlers, so a line means every handler of the message
returned in that delivery.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from consumer.errors import DeadLetter
from consumer.routing import EventContext

POISON_REASON = "ChaosPoison"


@dataclass(frozen=True)
class JournalEntry:
    """One successful handling of a message by one consumer process.

    `started_at` is when the first handler of this delivery began and `at` when the
    line was written. Both are wall-clock epoch seconds.
    """

    order_id: str
    message_id: str
    sequence_number: int
    delivery_count: int
    pid: int
    started_at: float
    at: float
    slow: bool = False


@dataclass(frozen=True)
class HandlerFaults:
    """Message ids whose handling the journal handler disturbs on purpose.

    Messages in `poison` raise `DeadLetter` with reason `ChaosPoison`. Messages in
    `flaky` fail their first in-process attempt with a `ConnectionError`. Messages in
    `slow` sleep `slow_s` seconds, longer than the broker's lock duration, so the lock
    must be renewed while they run.
    """

    poison: frozenset[str] = frozenset()
    flaky: frozenset[str] = frozenset()
    slow: frozenset[str] = frozenset()
    slow_s: float = 0.0

    def to_document(self) -> dict[str, Any]:
        """Return the faults as JSON-ready data for a consumer process."""
        return {
            "poison": sorted(self.poison),
            "flaky": sorted(self.flaky),
            "slow": sorted(self.slow),
            "slow_s": self.slow_s,
        }

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> HandlerFaults:
        """Read the faults written by `to_document`."""
        return cls(
            poison=frozenset(document["poison"]),
            flaky=frozenset(document["flaky"]),
            slow=frozenset(document["slow"]),
            slow_s=float(document["slow_s"]),
        )


class JournalHandler:
    """Appends a `JournalEntry` per handled message.

    Register `mark_start` before the bundled handlers and `handle` after them, for every
    event type. A retry skips handlers that already returned, so `mark_start` runs once
    per delivery and records when its first attempt began.
    """

    def __init__(self, directory: Path, faults: HandlerFaults) -> None:
        self._faults = faults
        self._pid = os.getpid()
        # Start times per message, oldest first. After a lost lock the handler of the
        # old delivery can still run while the same message is handled again, and
        # the old one, which started first, usually ends first.
        self._started_at: dict[tuple[str, int], list[float]] = {}
        path = directory / f"journal-{self._pid}.jsonl"
        self._file: TextIO = path.open("a", encoding="utf-8")

    async def mark_start(self, event: Any, ctx: EventContext) -> None:
        """Note when the handlers of this delivery began."""
        key = (ctx.message_id, ctx.sequence_number)
        self._started_at.setdefault(key, []).append(time.time())

    async def handle(self, event: Any, ctx: EventContext) -> None:
        """Record the handling of one message, after any planned fault."""
        message_id = ctx.message_id
        key = (message_id, ctx.sequence_number)
        if message_id in self._faults.poison:
            self._pop_start(key)
            raise DeadLetter(POISON_REASON, f"message {message_id} is poison by plan")
        if message_id in self._faults.flaky and ctx.attempt == 1:
            raise ConnectionError(f"planned first-attempt failure of {message_id}")
        slow = message_id in self._faults.slow
        if slow:
            await asyncio.sleep(self._faults.slow_s)
        entry = JournalEntry(
            order_id=ctx.order_id,
            message_id=message_id,
            sequence_number=ctx.sequence_number,
            delivery_count=ctx.delivery_count,
            pid=self._pid,
            started_at=self._pop_start(key),
            at=time.time(),
            slow=slow,
        )
        self._file.write(json.dumps(asdict(entry), separators=(",", ":")) + "\n")
        self._file.flush()

    def _pop_start(self, key: tuple[str, int]) -> float:
        starts = self._started_at.get(key)
        if not starts:
            return time.time()
        started_at = starts.pop(0)
        if not starts:
            del self._started_at[key]
        return started_at

    def close(self) -> None:
        """Close the journal file."""
        self._file.close()


def read_journal(directory: Path) -> list[JournalEntry]:
    """Read every consumer's journal in `directory`, sorted by handling time.

    A last line cut short by a `kill -9` in the middle of a write is skipped: its
    handler finished, but the line was never complete, so it counts as not written.
    """
    entries: list[JournalEntry] = []
    for path in sorted(directory.glob("journal-*.jsonl")):
        entries.extend(_read_lines(path.read_text(encoding="utf-8").splitlines()))
    return sorted(entries, key=lambda entry: entry.at)


def _read_lines(lines: Iterable[str]) -> Iterable[JournalEntry]:
    for line in lines:
        try:
            yield JournalEntry(**json.loads(line))
        except (ValueError, TypeError):
            continue
