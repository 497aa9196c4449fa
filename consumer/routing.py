"""Handler registration: `Router`, shared by `ConsumerApp` and team modules.

Teams keep their handlers on their own `Router` so that no module imports the app it
runs in, and `ConsumerApp.include_router` merges them. Registration checks the event
type and the handler's signature at once and raises `ConfigurationError` naming both.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from consumer.errors import ConfigurationError

HandlerFunc = Callable[[Any, "EventContext"], Awaitable[None] | None]


@dataclass(frozen=True)
class EventContext:
    """Message metadata passed to a handler together with the parsed event."""

    order_id: str
    message_id: str
    sequence_number: int
    delivery_count: int
    correlation_id: str | None
    enqueued_at: datetime | None
    event_type: str
    entity: str
    attempt: int
    log: Any  # a structlog BoundLogger with the message's ids bound


@dataclass(frozen=True)
class HandlerSpec:
    """One registered handler: the event type, the function and whether it is async."""

    event_type: str
    func: HandlerFunc
    is_async: bool

    @property
    def name(self) -> str:
        """Return `module.qualname` of the handler function."""
        return f"{self.func.__module__}.{self.func.__qualname__}"


def _known_event_types() -> frozenset[str]:
    from consumer.events import EVENT_TYPES

    return frozenset(EVENT_TYPES)


def _check_signature(event_type: str, func: Callable[..., Any]) -> None:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError) as error:
        raise ConfigurationError(
            f"handler {func!r} for {event_type} has no inspectable signature: {error}"
        ) from error
    positional = [
        parameter
        for parameter in signature.parameters.values()
        if parameter.kind
        in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ]
    has_varargs = any(
        parameter.kind == parameter.VAR_POSITIONAL
        for parameter in signature.parameters.values()
    )
    required_keyword_only = [
        parameter.name
        for parameter in signature.parameters.values()
        if parameter.kind == parameter.KEYWORD_ONLY
        and parameter.default is parameter.empty
    ]
    required_positional = [p for p in positional if p.default is p.empty]
    accepts_two = has_varargs or len(positional) >= 2
    if not accepts_two or len(required_positional) > 2 or required_keyword_only:
        raise ConfigurationError(
            f"handler {func.__module__}.{func.__qualname__} for {event_type} must "
            f"accept exactly (event, ctx), but its signature is {signature}"
        )


class Router:
    """An ordered registry of handlers by event type."""

    def __init__(self, *, known_event_types: frozenset[str] | None = None) -> None:
        self._known = known_event_types
        self._handlers: dict[str, list[HandlerSpec]] = {}

    def handler(self, event_type: str) -> Callable[[HandlerFunc], HandlerFunc]:
        """Register the decorated function for `event_type`, after existing ones."""

        def register(func: HandlerFunc) -> HandlerFunc:
            self.add_handler(event_type, func)
            return func

        return register

    def add_handler(self, event_type: str, func: HandlerFunc) -> None:
        """Register `func` for `event_type`, or raise `ConfigurationError`."""
        known = self._known if self._known is not None else _known_event_types()
        if event_type not in known:
            raise ConfigurationError(
                f"unknown event type {event_type!r} for handler "
                f"{getattr(func, '__qualname__', func)!r}; "
                f"known types: {', '.join(sorted(known))}"
            )
        if not callable(func):
            raise ConfigurationError(
                f"handler for {event_type} must be callable, got {type(func).__name__}"
            )
        _check_signature(event_type, func)
        is_async = asyncio.iscoroutinefunction(func) or inspect.iscoroutinefunction(
            getattr(func, "__call__", None)  # noqa: B004 - async callable objects
        )
        spec = HandlerSpec(event_type=event_type, func=func, is_async=is_async)
        if any(
            existing.func is func for existing in self._handlers.get(event_type, [])
        ):
            raise ConfigurationError(
                f"handler {spec.name} is already registered for {event_type}"
            )
        self._handlers.setdefault(event_type, []).append(spec)

    def include_router(self, other: Router) -> None:
        """Append every handler of `other`, keeping its registration order."""
        for event_type, specs in other._handlers.items():
            for spec in specs:
                self.add_handler(event_type, spec.func)

    def handlers_for(self, event_type: str) -> tuple[HandlerSpec, ...]:
        """Return the handlers of `event_type` in registration order (maybe none)."""
        return tuple(self._handlers.get(event_type, ()))

    @property
    def event_types(self) -> frozenset[str]:
        """Event types that have at least one handler."""
        return frozenset(self._handlers)


def bind_log(**ids: Any) -> Any:
    """Return a structlog logger with `ids` bound, for an `EventContext`.

    The logger is assembled from the logging configuration at its first use and then
    reused, so it is never assembled for a handler that does not log.
    """
    return structlog.wrap_logger(
        None,
        logger_factory_args=("orders_consumer.handler",),
        cache_logger_on_first_use=True,
        **ids,
    )
