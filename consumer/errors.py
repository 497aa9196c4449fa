"""Exception hierarchy of the framework.

Every exception the framework raises derives from `ConsumerError`. There are three
branches: configuration errors (also `ValueError`), transport errors, and signals that a
handler raises on purpose (`RetryLater`, `DeadLetter`). Logging treats the signals as
outcomes, not crashes.
"""

from __future__ import annotations


class ConsumerError(Exception):
    """Base class of every error raised by orders-consumer."""


class ConfigurationError(ConsumerError, ValueError):
    """Invalid settings or handler registration, raised at start-up with the fix."""


class TransportError(ConsumerError):
    """A broker operation failed in a way the caller has to handle."""


class SessionLockLost(TransportError):
    """Session lock expired or taken, so the worker must settle nothing more."""


class HandlerSignal(ConsumerError):
    """Base class of the signals a handler raises to choose its message's outcome."""


class RetryLater(HandlerSignal):
    """Ask for the message to be tried again after `delay_s` seconds.

    The retry happens in-process while the session lock is held, so the order's next
    message waits for it.
    """

    def __init__(self, delay_s: float = 0.0, reason: str = "") -> None:
        if delay_s < 0:
            raise ValueError(f"RetryLater delay_s must be >= 0, got {delay_s}")
        self.delay_s = delay_s
        self.reason = reason
        super().__init__(reason or f"retry requested after {delay_s}s")


class DeadLetter(HandlerSignal):
    """Dead-letter the message at once with `reason` and `description`."""

    def __init__(self, reason: str, description: str = "") -> None:
        if not reason:
            raise ValueError("DeadLetter needs a non-empty reason")
        self.reason = reason
        self.description = description
        super().__init__(f"{reason}: {description}" if description else reason)


class PermanentError(ConsumerError):
    """A failure that no retry can fix, such as an impossible order transition.

    Handlers raise subclasses of it. The message is dead-lettered with the class name as
    reason and the exception text as description, without retries.
    """
