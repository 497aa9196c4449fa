"""Trace context continued from message properties, with and without OpenTelemetry."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from consumer import tracing
from consumer.tracing import (
    inject_traceparent,
    span_for_message,
    trace_carrier,
)

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
OTHER_TRACEPARENT = "00-11111111111111111111111111111111-2222222222222222-01"


def test_carrier_reads_traceparent_and_state() -> None:
    carrier = trace_carrier({"traceparent": TRACEPARENT, "tracestate": "vendor=1"})

    assert carrier == {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}


def test_carrier_reads_bytes_diagnostic_id() -> None:
    carrier = trace_carrier({b"Diagnostic-Id": TRACEPARENT.encode(), b"other": 5})

    assert carrier == {"traceparent": TRACEPARENT}


def test_carrier_prefers_traceparent() -> None:
    carrier = trace_carrier(
        {"Diagnostic-Id": OTHER_TRACEPARENT, "traceparent": TRACEPARENT}
    )

    assert carrier == {"traceparent": TRACEPARENT}


def test_carrier_empty_without_headers() -> None:
    assert trace_carrier(None) == {}
    assert trace_carrier({"eventType": "ORDER_CREATED"}) == {}
    assert trace_carrier({"tracestate": "vendor=1"}) == {}


@pytest.fixture
def without_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make every `import opentelemetry...` raise ImportError for one test.

    `consumer.tracing` keeps the result of its import, so the kept result is dropped
    before the test and again after it.
    """
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    for name in list(sys.modules):
        if name.startswith("opentelemetry."):
            monkeypatch.setitem(sys.modules, name, None)
    tracing._opentelemetry.cache_clear()
    yield
    tracing._opentelemetry.cache_clear()


@pytest.mark.usefixtures("without_opentelemetry")
def test_span_is_noop_without_opentelemetry() -> None:
    with span_for_message({"traceparent": TRACEPARENT}, "process") as span:
        assert span is None
        assert inject_traceparent() == {}


@pytest.mark.usefixtures("without_opentelemetry")
def test_missing_opentelemetry_imported_once() -> None:
    for _ in range(3):
        with span_for_message({}, "process") as span:
            assert span is None
        assert inject_traceparent() == {}

    assert tracing._opentelemetry.cache_info().misses == 1


@pytest.mark.usefixtures("without_opentelemetry")
def test_noop_span_reraises() -> None:
    with (
        pytest.raises(KeyError),
        span_for_message({"traceparent": TRACEPARENT}, "process"),
    ):
        raise KeyError("orderId")


class Recorder:
    """An SDK tracer provider that keeps finished spans in memory."""

    def __init__(self) -> None:
        sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
        export = pytest.importorskip("opentelemetry.sdk.trace.export")
        in_memory = pytest.importorskip(
            "opentelemetry.sdk.trace.export.in_memory_span_exporter"
        )
        self.exporter = in_memory.InMemorySpanExporter()
        self.provider = sdk_trace.TracerProvider()
        self.provider.add_span_processor(export.SimpleSpanProcessor(self.exporter))

    def spans(self) -> list[Any]:
        return list(self.exporter.get_finished_spans())


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    recorder = Recorder()
    yield recorder
    recorder.provider.shutdown()


def test_span_continues_traceparent(recorder: Recorder) -> None:
    properties = {"traceparent": TRACEPARENT}
    attributes = {"messaging.message.id": "msg-1", "orders.attempt": 1, "x": None}

    with span_for_message(
        properties,
        "process ORDER_CREATED",
        attributes,
        tracer_provider=recorder.provider,
    ) as span:
        assert span is not None

    [finished] = recorder.spans()
    assert finished.name == "process ORDER_CREATED"
    assert format(finished.context.trace_id, "032x") == TRACE_ID
    assert format(finished.parent.span_id, "016x") == PARENT_SPAN_ID
    assert finished.kind.name == "CONSUMER"
    assert finished.attributes["messaging.system"] == "servicebus"
    assert finished.attributes["messaging.message.id"] == "msg-1"
    assert finished.attributes["orders.attempt"] == 1
    assert "x" not in finished.attributes


def test_span_continues_diagnostic_id(recorder: Recorder) -> None:
    properties = {b"Diagnostic-Id": TRACEPARENT.encode()}

    with span_for_message(properties, "process", tracer_provider=recorder.provider):
        pass

    [finished] = recorder.spans()
    assert format(finished.context.trace_id, "032x") == TRACE_ID


def test_span_without_headers_starts_trace(recorder: Recorder) -> None:
    with span_for_message({}, "process", tracer_provider=recorder.provider):
        pass

    [finished] = recorder.spans()
    assert finished.parent is None
    assert format(finished.context.trace_id, "032x") != TRACE_ID


def test_span_records_exception(recorder: Recorder) -> None:
    with (
        pytest.raises(ValueError, match="bad amount"),
        span_for_message(
            {"traceparent": TRACEPARENT}, "process", tracer_provider=recorder.provider
        ),
    ):
        raise ValueError("bad amount")

    [finished] = recorder.spans()
    assert finished.status.status_code.name == "ERROR"
    assert finished.events[0].name == "exception"


def test_inject_inside_span_returns_context(recorder: Recorder) -> None:
    with span_for_message(
        {"traceparent": TRACEPARENT}, "publish", tracer_provider=recorder.provider
    ):
        headers = inject_traceparent()

    [finished] = recorder.spans()
    span_id = format(finished.context.span_id, "016x")
    assert headers["traceparent"] == f"00-{TRACE_ID}-{span_id}-01"
    assert headers["Diagnostic-Id"] == headers["traceparent"]
    assert "tracestate" not in headers


def test_inject_outside_span_is_empty() -> None:
    pytest.importorskip("opentelemetry.trace")

    assert inject_traceparent() == {}


def test_injected_headers_round_trip(recorder: Recorder) -> None:
    with span_for_message({}, "publish", tracer_provider=recorder.provider):
        headers = inject_traceparent()
    with span_for_message(headers, "process", tracer_provider=recorder.provider):
        pass

    publish, process = recorder.spans()
    assert process.context.trace_id == publish.context.trace_id
    assert process.parent.span_id == publish.context.span_id


def test_published_message_carries_active_trace(recorder: Recorder) -> None:
    from consumer.generate import generate_stream
    from consumer.publish import build_message

    event = generate_stream(1, seed=3)[0]
    with span_for_message(
        {"traceparent": TRACEPARENT}, "publish", tracer_provider=recorder.provider
    ):
        message = build_message(event)

    properties = message.application_properties or {}
    traceparent = properties.get("traceparent")
    assert isinstance(traceparent, str)
    assert traceparent.split("-")[1] == TRACE_ID


def test_published_message_without_span_has_no_trace() -> None:
    from consumer.generate import generate_stream
    from consumer.publish import build_message

    message = build_message(generate_stream(1, seed=3)[0])

    assert "traceparent" not in (message.application_properties or {})


async def test_handled_message_continues_trace(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools

    import consumer.processor
    from consumer.app import ConsumerApp
    from consumer.config import Settings
    from consumer.generate import generate_stream
    from consumer.transport.memory import MemoryBroker, MemoryTransport

    monkeypatch.setattr(
        consumer.processor,
        "span_for_message",
        functools.partial(span_for_message, tracer_provider=recorder.provider),
    )
    broker = MemoryBroker("orders.trace.events")
    event = generate_stream(1, seed=4)[0]
    await broker.send(
        json.dumps(event).encode(),
        session_id=event["payload"]["orderId"],
        message_id="m-1",
        subject=event["eventType"],
        application_properties={"traceparent": TRACEPARENT},
    )
    settings = Settings(
        connection_string="Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=k;"
        "SharedAccessKey=unused",
        entity="orders.trace.events",
        session_idle_timeout_s=0.05,
        accept_timeout_s=0.05,
        metrics_port=0,
    )
    app = ConsumerApp(settings, transport=MemoryTransport(broker))
    app.router.add_handler(event["eventType"], _noop_handler)

    await asyncio.wait_for(app.run(until_idle_s=0.3), timeout=30)

    [finished] = recorder.spans()
    assert format(finished.context.trace_id, "032x") == TRACE_ID
    assert format(finished.parent.span_id, "016x") == PARENT_SPAN_ID
    assert finished.attributes["messaging.message.id"] == "m-1"


async def _noop_handler(event: Any, ctx: Any) -> None:
    return None


# Runs in its own interpreter because OpenTelemetry lets a process set the global
# tracer provider only once.
GLOBAL_PROVIDER_SCRIPT = """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from consumer.tracing import span_for_message

with span_for_message({}, "before") as span:
    assert not span.is_recording()
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
with span_for_message({}, "after") as span:
    assert span.is_recording()
print(",".join(span.name for span in exporter.get_finished_spans()))
"""


def test_global_provider_set_later_records() -> None:
    pytest.importorskip("opentelemetry.sdk.trace")

    completed = subprocess.run(
        [sys.executable, "-c", GLOBAL_PROVIDER_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "after"
