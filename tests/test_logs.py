"""Structured log output, per-message context and the repeat rate limiter."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any
from uuid import UUID

import pytest
import structlog

import consumer.logs
from consumer.logs import (
    MESSAGE_CONTEXT_KEYS,
    RateLimiter,
    bind_message_context,
    clear_message_context,
    configure_logging,
    message_context,
)

IDS = {
    "order_id": "ord-1001",
    "message_id": "msg-1",
    "correlation_id": "corr-9",
    "event_type": "ORDER_CREATED",
    "delivery_count": 1,
    "sequence_number": 42,
}


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers = list(root.handlers)
    level = root.level
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def _json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


def test_json_line_has_level_timestamp_event() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)

    structlog.get_logger().info("message_completed", entity="orders")

    [line] = _json_lines(stream)
    assert line["event"] == "message_completed"
    assert line["level"] == "info"
    assert line["entity"] == "orders"
    assert line["timestamp"].endswith("Z")


def test_bound_ids_on_every_line_then_cleared() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    log = structlog.get_logger()

    bind_message_context(**IDS)
    log.info("message_received")
    log.error("message_dead_lettered", reason="SchemaValidationFailed")
    clear_message_context()
    log.info("session_released")

    first, second, after = _json_lines(stream)
    for line in (first, second):
        for key, value in IDS.items():
            assert line[key] == value
    for key in MESSAGE_CONTEXT_KEYS:
        assert key not in after


def test_clear_keeps_other_bound_values() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    structlog.contextvars.bind_contextvars(entity="orders")

    bind_message_context(order_id="ord-1")
    clear_message_context()
    structlog.get_logger().info("session_idle")

    [line] = _json_lines(stream)
    assert line["entity"] == "orders"
    assert "order_id" not in line


def test_message_context_clears_on_exception() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)

    with pytest.raises(RuntimeError), message_context(order_id="ord-7"):
        raise RuntimeError("handler failed")
    structlog.get_logger().info("after_message")

    [line] = _json_lines(stream)
    assert "order_id" not in line


def test_bind_rejects_unknown_key() -> None:
    with pytest.raises(TypeError, match="unknown message context key.*order"):
        bind_message_context(orderId="ord-1")


def test_bind_skips_none_values() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)

    with message_context(order_id="ord-1", correlation_id=None):
        structlog.get_logger().info("message_received")

    [line] = _json_lines(stream)
    assert line["order_id"] == "ord-1"
    assert "correlation_id" not in line


async def test_context_is_separate_per_task() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    log = structlog.get_logger()
    both_bound = asyncio.Barrier(2)

    async def handle(order_id: str) -> None:
        with message_context(order_id=order_id):
            await both_bound.wait()
            log.info("message_completed", handled=order_id)

    await asyncio.gather(handle("ord-a"), handle("ord-b"))

    lines = _json_lines(stream)
    assert len(lines) == 2
    for line in lines:
        assert line["order_id"] == line["handled"]


def test_level_filter_drops_debug() -> None:
    stream = io.StringIO()
    configure_logging("json", level="info", stream=stream)
    log = structlog.get_logger()

    log.debug("message_skipped")
    log.warning("handler_retried")

    lines = _json_lines(stream)
    assert [line["event"] for line in lines] == ["handler_retried"]


def test_debug_level_keeps_debug() -> None:
    stream = io.StringIO()
    configure_logging("json", level="debug", stream=stream)

    structlog.get_logger().debug("message_skipped")

    assert [line["event"] for line in _json_lines(stream)] == ["message_skipped"]


def test_exception_line_has_traceback() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)

    try:
        raise KeyError("missing field")
    except KeyError:
        structlog.get_logger().exception("handler_crashed")

    [line] = _json_lines(stream)
    assert line["level"] == "error"
    assert "KeyError: 'missing field'" in line["exception"]


def test_stdlib_logger_goes_through_json() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)

    with message_context(order_id="ord-5"):
        logging.getLogger("orders.test").warning("disk %s full", "/var")

    [line] = _json_lines(stream)
    assert line["event"] == "disk /var full"
    assert line["logger"] == "orders.test"
    assert line["level"] == "warning"
    assert line["order_id"] == "ord-5"


def test_azure_info_lines_are_dropped() -> None:
    stream = io.StringIO()
    configure_logging("json", level="info", stream=stream)

    logging.getLogger("azure.servicebus").info("link attached")
    logging.getLogger("azure.servicebus").warning("link detached")

    assert [line["event"] for line in _json_lines(stream)] == ["link detached"]


def test_configure_twice_replaces_output() -> None:
    first = io.StringIO()
    second = io.StringIO()
    configure_logging("json", stream=first)
    configure_logging("json", stream=second)

    structlog.get_logger().info("one")
    logging.getLogger("orders.test").warning("two")

    assert first.getvalue() == ""
    assert [line["event"] for line in _json_lines(second)] == ["one", "two"]
    ours = [
        h for h in logging.getLogger().handlers if h.get_name() == "orders-consumer"
    ]
    assert len(ours) == 1


def test_console_format_is_readable() -> None:
    stream = io.StringIO()
    configure_logging("console", stream=stream)

    with message_context(order_id="ord-3"):
        structlog.get_logger().warning("session_parked", reason="OutOfOrder")

    text = stream.getvalue()
    assert "session_parked" in text
    assert "order_id=ord-3" in text
    assert "warning" in text
    assert "\x1b[" not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_console_escapes_control_characters() -> None:
    stream = io.StringIO()
    configure_logging("console", stream=stream)

    with message_context(order_id="X-\x1b[2J\x1b[31mRED"):
        structlog.get_logger().warning("session_parked", event_type="A\nlevel=forged")
    logging.getLogger("orders.test").warning("link %s lost", "L-\x1b]8;;x\x07")
    try:
        raise ValueError("bad id B-\x1b[5m")
    except ValueError:
        structlog.get_logger().exception("handler_crashed")

    text = stream.getvalue()
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "order_id='X-\\x1b[2J\\x1b[31mRED'" in text
    assert "event_type='A\\nlevel=forged'" in text
    assert "'link L-\\x1b]8;;x\\x07 lost'" in text
    assert "ValueError: bad id B-\\x1b[5m" in text


@pytest.mark.parametrize(
    ("log_format", "level", "message"),
    [
        ("xml", "info", "log_format must be"),
        ("json", "verbose", "log level must be one of"),
    ],
)
def test_configure_rejects_invalid_values(
    log_format: str, level: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        configure_logging(log_format, level=level)  # type: ignore[arg-type]


def test_docstring_has_level_table() -> None:
    doc = consumer.logs.__doc__ or ""
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in doc.splitlines()
        if line.startswith("|") and "---" not in line
    }

    assert rows["message handled and completed"] == "debug"
    assert rows["handler attempt failed, retry follows"] == "warning"
    assert rows["message dead-lettered"] == "error"
    assert rows["session parked, later messages deferred"] == "warning"
    assert rows["session or message lock lost"] == "warning"
    assert rows["unexpected exception (crash)"] == "exception"


class FakeClock:
    """A monotonic clock that the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_allows_first_and_counts_repeats() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, clock=clock)

    assert limiter.allow("connect_failed")
    assert not limiter.allow("connect_failed")
    assert not limiter.allow("connect_failed")

    assert limiter.suppressed("connect_failed") == 2
    assert limiter.suppressed_total == 2


def test_rate_limiter_allows_after_interval() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, clock=clock)
    limiter.allow("connect_failed")
    limiter.allow("connect_failed")

    clock.now += 9.9
    assert not limiter.allow("connect_failed")
    clock.now += 0.1
    assert limiter.allow("connect_failed")

    assert limiter.pop_suppressed("connect_failed") == 2
    assert limiter.pop_suppressed("connect_failed") == 0


def test_rate_limiter_keys_are_independent() -> None:
    limiter = RateLimiter(10.0, clock=FakeClock())

    assert limiter.allow("connect_failed")
    assert limiter.allow("lock_renewal_failed")
    assert not limiter.allow("connect_failed")

    assert limiter.suppressed("lock_renewal_failed") == 0


def test_rate_limiter_evicts_oldest_key() -> None:
    limiter = RateLimiter(10.0, max_keys=2, clock=FakeClock())
    limiter.allow("a")
    limiter.allow("a")
    limiter.allow("b")

    limiter.allow("c")

    assert limiter.suppressed("a") == 0
    assert limiter.allow("a")
    assert not limiter.allow("c")


def test_rate_limiter_zero_interval_allows_all() -> None:
    limiter = RateLimiter(0.0, clock=FakeClock())

    assert limiter.allow("x")
    assert limiter.allow("x")
    assert limiter.suppressed_total == 0


@pytest.mark.parametrize(
    ("interval_s", "max_keys", "message"),
    [(-1.0, 10, "interval_s must be >= 0"), (1.0, 0, "max_keys must be >= 1")],
)
def test_rate_limiter_rejects_invalid_args(
    interval_s: float, max_keys: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        RateLimiter(interval_s, max_keys=max_keys)


def test_rate_limited_lines_carry_suppressed_count() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    clock = FakeClock()
    limiter = RateLimiter(30.0, clock=clock)
    log = structlog.get_logger()

    # One failure every 10 s for 60 s: lines at 0, 30 and 60 s, two repeats between.
    for step in range(7):
        clock.now = 1000.0 + 10.0 * step
        if limiter.allow("connect_failed"):
            suppressed = limiter.pop_suppressed("connect_failed")
            log.error("connect_failed", suppressed=suppressed)

    lines = _json_lines(stream)
    assert [line["suppressed"] for line in lines] == [0, 2, 2]


def test_json_renders_common_types() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    enqueued_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    lock_token = UUID("12345678-1234-5678-1234-567812345678")

    structlog.get_logger().info(
        "message_received",
        enqueued_at=enqueued_at,
        lock_token=lock_token,
        store=PurePosixPath("var/orders.sqlite3"),
        sequence_numbers=(1, 2),
    )

    [line] = _json_lines(stream)
    assert line["enqueued_at"] == "2026-01-02T03:04:05+00:00"
    assert line["lock_token"] == "12345678-1234-5678-1234-567812345678"
    assert line["store"] == "var/orders.sqlite3"
    assert line["sequence_numbers"] == [1, 2]
