"""Optional OpenTelemetry tracing: one consumer span per handled message.

A publisher that traces puts the W3C trace context in the message's application
properties: `traceparent` (and `tracestate`), or `Diagnostic-Id` containing the same
`traceparent` value, the older name the Azure SDKs use (azure-servicebus 7.15.0 sets
both, with bytes keys). `span_for_message` continues that trace. Without the `tracing`
extra (opentelemetry-api) both functions do nothing, so the consumer runs the same
with or without it. Spans are exported only when the application configures an
OpenTelemetry SDK `TracerProvider`.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from types import ModuleType
from typing import Any, NamedTuple

TRACER_NAME = "orders-consumer"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
DIAGNOSTIC_ID = "Diagnostic-Id"

AttributeValue = str | bool | int | float


class _OpenTelemetry(NamedTuple):
    """The parts of opentelemetry-api this module uses."""

    trace: ModuleType
    propagator: Any  # a W3C TraceContextTextMapPropagator
    # From the global tracer provider. Taken before a provider is configured, it is a
    # `ProxyTracer` that follows the one configured later. Keeping it is safe because
    # opentelemetry-api (1.45) ignores a second `set_tracer_provider`.
    global_tracer: Any


@functools.cache
def _opentelemetry() -> _OpenTelemetry | None:
    """Import opentelemetry-api once, or return None when it is not installed.

    The result is kept because a failed import searches `sys.path` again on every
    call, about 70 us per message (timeit, Python 3.11, a shared 2-core machine).
    """
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import (
            TraceContextTextMapPropagator,
        )
    except ImportError:
        return None
    propagator = TraceContextTextMapPropagator()
    return _OpenTelemetry(trace, propagator, trace.get_tracer(TRACER_NAME))


# Tracers of providers passed in explicitly, one per provider, as instrumentation
# usually keeps one tracer instead of asking the provider for each span.
_tracers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _tracer(api: _OpenTelemetry, tracer_provider: Any) -> Any:
    if tracer_provider is None:
        return api.global_tracer
    tracer = _tracers.get(tracer_provider)
    if tracer is None:
        tracer = api.trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
        _tracers[tracer_provider] = tracer
    return tracer


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    return None


def trace_carrier(application_properties: Mapping[Any, Any] | None) -> dict[str, str]:
    """Return the W3C trace headers found in a message's application properties.

    Keys and values may be `str` or `bytes` (the Azure SDK returns bytes keys). A
    `traceparent` property takes precedence over `Diagnostic-Id`. The result uses
    lowercase keys, as the W3C propagator expects.
    """
    found: dict[str, str] = {}
    for raw_key, raw_value in (application_properties or {}).items():
        key = _text(raw_key)
        value = _text(raw_value)
        if key is not None and value is not None:
            found[key.lower()] = value

    carrier: dict[str, str] = {}
    traceparent = found.get(TRACEPARENT) or found.get(DIAGNOSTIC_ID.lower())
    if traceparent:
        carrier[TRACEPARENT] = traceparent
        if found.get(TRACESTATE):
            carrier[TRACESTATE] = found[TRACESTATE]
    return carrier


def _clean_attributes(
    attributes: Mapping[str, Any] | None,
) -> dict[str, AttributeValue]:
    # OpenTelemetry drops (and warns about) None and other non-primitive values.
    cleaned: dict[str, AttributeValue] = {"messaging.system": "servicebus"}
    for key, value in (attributes or {}).items():
        if isinstance(value, str | bool | int | float):
            cleaned[key] = value
        elif value is not None:
            cleaned[key] = str(value)
    return cleaned


def span_for_message(
    application_properties: Mapping[Any, Any] | None,
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    tracer_provider: Any = None,
) -> AbstractContextManager[Any]:
    """Start a consumer span that continues the message's trace, for a `with` block.

    `with span_for_message(...) as span` runs the block with `span` as the current
    span, or with `span` None when opentelemetry-api is not installed. Without trace
    headers in `application_properties` the span starts a new trace. An exception
    leaving the block is recorded on the span and re-raised, and the span ends with
    the block. `tracer_provider` defaults to the global one.
    """
    api = _opentelemetry()
    if api is None:
        return nullcontext()

    parent = api.propagator.extract(trace_carrier(application_properties))
    span = _tracer(api, tracer_provider).start_span(
        name,
        context=parent,
        kind=api.trace.SpanKind.CONSUMER,
        attributes=_clean_attributes(attributes),
    )
    # What `Tracer.start_as_current_span` does, without its two context manager
    # layers around `use_span` (opentelemetry-api and -sdk 1.45).
    return api.trace.use_span(span, end_on_exit=True)  # type: ignore[no-any-return]


def inject_traceparent() -> dict[str, str]:
    """Return the current trace context as message application properties.

    The result contains `traceparent`, `tracestate` when not empty, and `Diagnostic-Id`
    with the `traceparent` value for consumers that read the older name. It is empty
    when opentelemetry-api is not installed or no span is active.
    """
    api = _opentelemetry()
    if api is None:
        return {}

    carrier: dict[str, str] = {}
    api.propagator.inject(carrier)
    if TRACEPARENT in carrier:
        carrier[DIAGNOSTIC_ID] = carrier[TRACEPARENT]
    return carrier
