"""orders-consumer: a session-ordered consumer for the Service Bus order stream."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from consumer.config import Settings, load_settings
from consumer.errors import (
    ConfigurationError,
    ConsumerError,
    DeadLetter,
    PermanentError,
    RetryLater,
)
from consumer.routing import EventContext, Router

if TYPE_CHECKING:
    from consumer.app import ConsumerApp

__all__ = [
    "ConfigurationError",
    "ConsumerApp",
    "ConsumerError",
    "DeadLetter",
    "EventContext",
    "PermanentError",
    "RetryLater",
    "Router",
    "Settings",
    "load_settings",
]


def __getattr__(name: str) -> Any:
    # The app pulls in the Azure SDK; import it only when asked for.
    if name == "ConsumerApp":
        from consumer.app import ConsumerApp

        return ConsumerApp
    raise AttributeError(f"module 'consumer' has no attribute {name!r}")
