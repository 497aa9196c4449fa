"""In-process retries: attempt counts, backoff bounds and early stops."""

from __future__ import annotations

import asyncio
import random

import pytest

from consumer.errors import DeadLetter, PermanentError, RetryLater
from consumer.retry import AttemptFailure, RetryPolicy, run_with_retries

FAST = RetryPolicy(attempts=3, backoff_s=0.001, max_backoff_s=0.002)


class Flaky:
    """An attempt function that raises `errors` in turn, then succeeds."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls: list[int] = []

    async def __call__(self, attempt: int) -> None:
        self.calls.append(attempt)
        if self.errors:
            raise self.errors.pop(0)


async def test_success_after_two_failures() -> None:
    flaky = Flaky(ValueError("a"), ValueError("b"))
    failures: list[AttemptFailure] = []

    error = await run_with_retries(
        flaky, FAST, stop=asyncio.Event(), on_failure=failures.append
    )

    assert error is None
    assert flaky.calls == [1, 2, 3]
    assert [failure.will_retry for failure in failures] == [True, True]


async def test_spent_attempts_return_last_error() -> None:
    flaky = Flaky(ValueError("a"), ValueError("b"), ValueError("c"))
    failures: list[AttemptFailure] = []

    error = await run_with_retries(
        flaky, FAST, stop=asyncio.Event(), on_failure=failures.append
    )

    assert isinstance(error, ValueError)
    assert str(error) == "c"
    assert failures[-1].will_retry is False


@pytest.mark.parametrize(
    "signal", [DeadLetter("Fraud", "score"), PermanentError("impossible")]
)
async def test_permanent_errors_stop_at_once(signal: Exception) -> None:
    flaky = Flaky(signal)

    error = await run_with_retries(
        flaky, FAST, stop=asyncio.Event(), on_failure=lambda _: None
    )

    assert error is signal
    assert flaky.calls == [1]


async def test_stop_event_ends_retries() -> None:
    stop = asyncio.Event()
    stop.set()
    flaky = Flaky(ValueError("a"), ValueError("b"))

    error = await run_with_retries(flaky, FAST, stop=stop, on_failure=lambda _: None)

    assert isinstance(error, ValueError)
    assert flaky.calls == [1]


def test_backoff_grows_within_jitter_bounds() -> None:
    policy = RetryPolicy(attempts=5, backoff_s=1.0, max_backoff_s=3.0)
    rng = random.Random(7)
    error = ValueError("x")

    for attempt, step in [(1, 1.0), (2, 2.0), (3, 3.0), (4, 3.0)]:
        delays = [policy.delay_s(attempt, error, rng) for _ in range(200)]
        assert min(delays) >= step / 2
        assert max(delays) <= step


def test_retry_later_delay_is_capped() -> None:
    policy = RetryPolicy(attempts=3, backoff_s=0.1, max_backoff_s=2.0)
    rng = random.Random(1)

    assert policy.delay_s(1, RetryLater(0.5), rng) == 0.5
    assert policy.delay_s(1, RetryLater(60.0), rng) == 2.0
