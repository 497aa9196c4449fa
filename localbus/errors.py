"""Errors the broker returns to clients, with the AMQP condition Service Bus uses."""

from __future__ import annotations

NOT_FOUND = "amqp:not-found"
NOT_ALLOWED = "amqp:not-allowed"
UNAUTHORIZED = "amqp:unauthorized-access"
MESSAGE_SIZE_EXCEEDED = "amqp:link:message-size-exceeded"
DECODE_ERROR = "amqp:decode-error"
INTERNAL_ERROR = "amqp:internal-error"
TIMEOUT = "com.microsoft:timeout"
SESSION_LOCK_LOST = "com.microsoft:session-lock-lost"
SESSION_CANNOT_BE_LOCKED = "com.microsoft:session-cannot-be-locked"
MESSAGE_LOCK_LOST = "com.microsoft:message-lock-lost"
MESSAGE_NOT_FOUND = "com.microsoft:message-not-found"
SESSION_NOT_FOUND = "com.microsoft:session-not-found"
ARGUMENT_ERROR = "com.microsoft:argument-error"
ARGUMENT_OUT_OF_RANGE = "com.microsoft:argument-out-of-range"
DEAD_LETTER = "com.microsoft:dead-letter"

# Status codes of `$management` replies for each condition (HTTP semantics).
STATUS_BY_CONDITION = {
    NOT_FOUND: 404,
    MESSAGE_NOT_FOUND: 404,
    SESSION_NOT_FOUND: 404,
    MESSAGE_LOCK_LOST: 410,
    SESSION_LOCK_LOST: 410,
    SESSION_CANNOT_BE_LOCKED: 409,
    ARGUMENT_ERROR: 400,
    ARGUMENT_OUT_OF_RANGE: 400,
    NOT_ALLOWED: 400,
    UNAUTHORIZED: 401,
    MESSAGE_SIZE_EXCEEDED: 413,
    TIMEOUT: 408,
}


class BrokerError(Exception):
    """A request the broker rejects, carried to the client as an AMQP error."""

    def __init__(self, condition: str, description: str) -> None:
        super().__init__(f"{condition}: {description}")
        self.condition = condition
        self.description = description

    @property
    def status_code(self) -> int:
        """HTTP-style status code for `$management` replies."""
        return STATUS_BY_CONDITION.get(self.condition, 500)
