"""A session held by one worker, and the small waits the worker is built from."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from consumer.checkpoint import SessionCheckpoint
from consumer.transport import InboundMessage, SessionReceiver

T = TypeVar("T")


class CallbackEvent(asyncio.Event):
    """An `asyncio.Event` that also calls registered callbacks when it is set.

    `unless_set` registers a callback for the length of one wait instead of starting a
    task per wait that awaits `wait()`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []

    def set(self) -> None:
        """Set the event, wake its waiters and call every registered callback once."""
        if self.is_set():
            return
        super().set()
        for callback in tuple(self._callbacks):
            callback()

    def add_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the event is set, until `remove_callback`."""
        self._callbacks.append(callback)

    def remove_callback(self, callback: Callable[[], None]) -> None:
        """Stop calling `callback`, ignoring one that is not registered."""
        if callback in self._callbacks:
            self._callbacks.remove(callback)


# A plain `asyncio.Event` gets a `CallbackEvent` copy, set by one watcher task that
# lives until the original is set. Keyed weakly, so a dropped event leaves no entry.
_copies: weakref.WeakKeyDictionary[asyncio.Event, CallbackEvent] = (
    weakref.WeakKeyDictionary()
)


def _callback_event(event: asyncio.Event) -> CallbackEvent:
    if isinstance(event, CallbackEvent):
        return event
    copy = _copies.get(event)
    if copy is None:
        copy = CallbackEvent()
        _copies[event] = copy
        # The task needs no reference here, because the future it waits on, which
        # `event` stores, keeps it alive until the event is set.
        asyncio.get_running_loop().create_task(_copy_when_set(event, copy))
    return copy


async def _copy_when_set(event: asyncio.Event, copy: CallbackEvent) -> None:
    # NOTE: the task waits until `event` is set. The processor's stop event, the only
    # plain event passed to `unless_set`, is always set when `run` returns.
    await event.wait()
    copy.set()


async def unless_set(
    operation: Coroutine[Any, Any, T], *events: asyncio.Event
) -> tuple[bool, T | None]:
    """Await `operation` unless one of `events` is set first, which cancels it.

    Return whether the operation finished, and its result (None when cancelled). The
    operation runs in the calling task, and setting an event cancels that task the way
    `asyncio.timeout` does, so a call starts no task. A cancellation of the calling
    task from elsewhere still propagates.
    """
    if any(event.is_set() for event in events):
        operation.close()
        return False, None
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("unless_set must run inside an asyncio task")
    signals = [_callback_event(event) for event in events]
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            task.cancel()

    for signal in signals:
        signal.add_callback(interrupt)
    try:
        result = await operation
    except asyncio.CancelledError:
        if interrupted and task.uncancel() == 0:
            return False, None
        raise
    finally:
        for signal in signals:
            signal.remove_callback(interrupt)
    if interrupted:
        # The operation swallowed the cancellation and returned, so keep its result
        # and withdraw the cancel request before it hits a later await.
        task.uncancel()
    return True, result


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
    lock_lost: asyncio.Event = field(default_factory=CallbackEvent)
    checkpoint: SessionCheckpoint = field(default_factory=SessionCheckpoint)
    message_started_at: float | None = None
    # Highest sequence number a peek found queued in this session. Until the worker
    # has handled it, more messages follow without asking the broker again.
    queued_through: int = 0
    # The checkpoint to settle from while the stored one parks the order at a
    # message on its last delivery (see `SessionProcessor._guard_last_delivery`).
    unguarded: SessionCheckpoint | None = None

    @property
    def session_id(self) -> str:
        """Id of the session, which is the order id."""
        return self.receiver.session_id

    def lock_expired(self) -> bool:
        """Return whether the lock expiry reported by the broker has passed."""
        locked_until = self.receiver.locked_until
        return locked_until is not None and locked_until <= datetime.now(UTC)
