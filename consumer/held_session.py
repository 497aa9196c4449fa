"""A session held by one worker, and the small waits the worker is built from."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from consumer.checkpoint import SessionCheckpoint
from consumer.transport import InboundMessage, SessionReceiver

T = TypeVar("T")


async def unless_set(
    operation: Awaitable[T], *events: asyncio.Event
) -> tuple[bool, T | None]:
    """Await `operation` unless one of `events` is set first, which cancels it.

    Return whether the operation finished, and its result (None when cancelled).
    Cancelling the caller cancels the operation too.
    """
    task = asyncio.ensure_future(operation)
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait({task, *waiters}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # Left running, a stopped worker's `take()` could still hand out a session
        # that no worker would then work.
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    finally:
        for waiter in waiters:
            waiter.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return False, None


def is_older_copy(checkpoint: SessionCheckpoint, message: InboundMessage) -> bool:
    """Return whether `message` is a resubmitted copy the order already moved past.

    An unpark or a resubmit by the tools defers its copies and lists them in the
    session state, so they arrive through `receive_deferred`. A copy that arrives
    as an active message was sent some other way.
    """
    original = message.original_sequence_number
    return original is not None and original < checkpoint.last_sequence_number


@dataclass
class HeldSession:
    """A session this process holds, with the worker's view of its state."""

    receiver: SessionReceiver
    lock_lost: asyncio.Event = field(default_factory=asyncio.Event)
    checkpoint: SessionCheckpoint = field(default_factory=SessionCheckpoint)
    message_started_at: float | None = None

    @property
    def session_id(self) -> str:
        """Id of the session, which is the order id."""
        return self.receiver.session_id

    def lock_expired(self) -> bool:
        """Return whether the lock expiry reported by the broker has passed."""
        locked_until = self.receiver.locked_until
        return locked_until is not None and locked_until <= datetime.now(UTC)
