"""In-process retries with exponential backoff and jitter while the lock is held.

The session lock stays renewed during the retries, so the order's next message waits
for them. Once the attempts are spent the caller settles the message: abandon, or
dead-letter when the delivery count is about to run out.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from consumer.config import Settings
from consumer.errors import DeadLetter, PermanentError, RetryLater

# Shared by every message: jitter needs no per-message seed.
_JITTER = random.Random()


def is_retryable(error: BaseException) -> bool:
    """Return False for `DeadLetter` and `PermanentError`, which no retry changes."""
    return not isinstance(error, DeadLetter | PermanentError)


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts one delivery gets and how long to wait between them."""

    attempts: int
    backoff_s: float
    max_backoff_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """Build the policy from `retry_attempts`, `retry_backoff_s` and the cap."""
        return cls(
            attempts=settings.retry_attempts,
            backoff_s=settings.retry_backoff_s,
            max_backoff_s=settings.retry_max_backoff_s,
        )

    def delay_s(self, attempt: int, error: BaseException, rng: random.Random) -> float:
        """Return the wait before the attempt after `attempt` (1-based) failed.

        The exponential step is `backoff_s * 2 ** (attempt - 1)`, capped at
        `max_backoff_s`, and the wait is drawn between half of it and all of it so that
        sessions failing together do not retry in lockstep. `RetryLater(delay_s)` sets
        its own delay, also capped at `max_backoff_s` so the retry budget checked at
        start-up holds.
        """
        if isinstance(error, RetryLater) and error.delay_s > 0:
            return min(error.delay_s, self.max_backoff_s)
        step = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
        return step / 2 + rng.uniform(0, step / 2)


@dataclass(frozen=True)
class AttemptFailure:
    """A failed attempt reported to the retry observer."""

    attempt: int
    error: BaseException
    delay_s: float
    will_retry: bool


async def run_with_retries(
    attempt: Callable[[int], Awaitable[None]],
    policy: RetryPolicy,
    *,
    stop: asyncio.Event,
    on_failure: Callable[[AttemptFailure], None],
    rng: random.Random | None = None,
) -> BaseException | None:
    """Call `attempt(n)` for n = 1.. until it returns, and return None on success.

    Return the last error when the attempts are spent, when the error is not retryable,
    or when `stop` is set (for example because the session lock was lost). Cancellation
    propagates.
    """
    rng = rng or _JITTER
    for number in range(1, policy.attempts + 1):
        try:
            await attempt(number)
        except Exception as error:  # noqa: BLE001 - a handler may raise anything
            will_retry = (
                number < policy.attempts and is_retryable(error) and not stop.is_set()
            )
            delay = policy.delay_s(number, error, rng) if will_retry else 0.0
            on_failure(AttemptFailure(number, error, delay, will_retry))
            if not will_retry:
                return error
            if await _wait_or_stop(stop, delay):
                return error
        else:
            return None
    raise AssertionError("unreachable: the loop returns on its last attempt")


async def _wait_or_stop(stop: asyncio.Event, delay_s: float) -> bool:
    """Sleep `delay_s` unless `stop` is set first; return whether it was set."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay_s)
    except TimeoutError:
        return False
    return True
