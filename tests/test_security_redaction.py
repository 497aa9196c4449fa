"""No key, signature or token reaches the log output, in either log format."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from consumer.logs import configure_logging, log_exception_text, message_context
from tests.conftest import consumer_environment

# A made-up key in the shape of a Service Bus shared access key (base64, 44 characters).
FAKE_KEY = "Zm9yLXRlc3RzLW9ubHktbm90LWEtcmVhbC1rZXktMDE="
CONNECTION_STRING = (
    "Endpoint=sb://orders-prod.servicebus.windows.net/;"
    f"SharedAccessKeyName=consumer;SharedAccessKey={FAKE_KEY}"
)
FAKE_SIGNATURE = "c2lnbmF0dXJlLWZvci10ZXN0cy1vbmx5"
SAS_TOKEN = (
    "SharedAccessSignature sr=sb%3a%2f%2forders-prod.servicebus.windows.net%2f"
    f"&sig={FAKE_SIGNATURE}&se=1767225600&skn=consumer"
)
SECRETS = (FAKE_KEY, FAKE_SIGNATURE)
FORMATS = ("json", "console")


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


def _configured(log_format: str) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(log_format, stream=stream)  # type: ignore[arg-type]
    return stream


def _assert_no_secret(output: str) -> None:
    assert output, "nothing was logged"
    for secret in SECRETS:
        assert secret not in output


@pytest.mark.parametrize("log_format", FORMATS)
def test_secret_in_event_text_redacted(log_format: str) -> None:
    stream = _configured(log_format)

    structlog.get_logger().error(f"connect failed for {CONNECTION_STRING}")

    _assert_no_secret(stream.getvalue())
    assert "SharedAccessKey=***" in stream.getvalue()


@pytest.mark.parametrize("log_format", FORMATS)
def test_secret_in_fields_redacted(log_format: str) -> None:
    stream = _configured(log_format)

    structlog.get_logger().warning(
        "token_refresh_failed",
        detail={"auth": SAS_TOKEN, "attempts": [CONNECTION_STRING]},
        error=ConnectionError(f"rejected {SAS_TOKEN}"),
    )

    _assert_no_secret(stream.getvalue())


@pytest.mark.parametrize("log_format", FORMATS)
def test_secret_named_fields_masked(log_format: str) -> None:
    stream = _configured(log_format)

    structlog.get_logger().info(
        "settings_loaded", token="opaque-token-value", password="hunter2"
    )

    output = stream.getvalue()
    assert "opaque-token-value" not in output
    assert "hunter2" not in output


@pytest.mark.parametrize("log_format", FORMATS)
def test_secret_in_exception_text_redacted(log_format: str) -> None:
    stream = _configured(log_format)

    try:
        try:
            raise OSError(f"socket closed while using {SAS_TOKEN}")
        except OSError as cause:
            raise ConnectionError(f"cannot open {CONNECTION_STRING}") from cause
    except ConnectionError:
        with message_context(order_id="ord-1"):
            structlog.get_logger().exception("connection_lost")

    output = stream.getvalue()
    _assert_no_secret(output)
    assert "ConnectionError: cannot open" in output
    assert "OSError: socket closed" in output


@pytest.mark.parametrize("log_format", FORMATS)
def test_stdlib_exception_text_redacted(log_format: str) -> None:
    stream = _configured(log_format)

    try:
        raise ValueError(f"bad connection string {CONNECTION_STRING}")
    except ValueError:
        logging.getLogger("azure.servicebus").exception("client failed")

    output = stream.getvalue()
    _assert_no_secret(output)
    assert "ValueError: bad connection string" in output


def _raise_with_secret_local() -> None:
    shared_access_key = FAKE_KEY  # noqa: F841 (visible to a locals dump)
    raise RuntimeError("handler failed")


def test_console_traceback_omits_locals() -> None:
    stream = _configured("console")

    try:
        _raise_with_secret_local()
    except RuntimeError:
        structlog.get_logger().exception("handler_crashed")

    output = stream.getvalue()
    _assert_no_secret(output)
    assert "RuntimeError: handler failed" in output


def test_log_exception_text_redacts() -> None:
    error = PermissionError(f"unauthorized: {CONNECTION_STRING}")

    text = log_exception_text(error)

    assert text.startswith("PermissionError: unauthorized:")
    assert FAKE_KEY not in text


# An application run as the README shows: no logging set up before `app.run()`.
APP_SCRIPT = """
import asyncio
import json
import sys

from consumer import ConsumerApp, load_settings
from consumer.testing import make_event
from consumer.transport.memory import MemoryBroker, MemoryTransport

NOTE = sys.argv[1]


async def main() -> None:
    broker = MemoryBroker("orders.dev.events")
    event = make_event("ORDER_CREATED", "ORD-1")
    await broker.send(
        json.dumps(event).encode(), session_id="ORD-1", message_id="m1"
    )
    app = ConsumerApp(load_settings("dev"), transport=MemoryTransport(broker))

    @app.handler("ORDER_CREATED")
    async def log_note(event, ctx) -> None:
        ctx.log.info("handler_note", note=NOTE, password="not-a-real-password")

    await app.run(until_idle_s=0.5)


asyncio.run(main())
"""


def test_app_run_configures_masked_logging(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", APP_SCRIPT, CONNECTION_STRING],
        cwd=tmp_path,
        env=consumer_environment({"metrics_port": 0}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "handler_note" in output
    assert FAKE_KEY not in output
    assert "not-a-real-password" not in output
    # The default level is info, so the debug line of each completion is left out.
    assert "message_completed" not in output
