"""The orders-consumer command line: exit codes and output."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumer.cli import EXIT_CONFIGURATION, main
from consumer.testing import make_event
from localbus.testing import RunningBroker, run_broker
from tests.test_publish import receive_sessions

PUBLISH_QUEUE = "cli.publish"


def test_generate_writes_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--orders", "3", "--seed", "4"])

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert len(lines) >= 3
    assert {json.loads(line)["payload"]["orderId"] for line in lines} == {
        "ORD-100000",
        "ORD-100001",
        "ORD-100002",
    }


def test_invalid_setting_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ORDERS_CONSUMER_MAX_CONCURRENT_SESSIONS", "0")

    code = main(["run", "--env", "dev"])

    error = capsys.readouterr().err
    assert code == EXIT_CONFIGURATION
    assert "max_concurrent_sessions" in error
    assert "Traceback" not in error


def test_config_error_hides_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "c2VjcmV0LWtleS12YWx1ZQ=="
    monkeypatch.setenv(
        "ORDERS_CONSUMER_CONNECTION_STRING",
        f"Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=k;SharedAccessKey={secret}",
    )
    monkeypatch.setenv("ORDERS_CONSUMER_RETRY_ATTEMPTS", "0")

    code = main(["run", "--env", "dev"])

    output = capsys.readouterr()
    assert code == EXIT_CONFIGURATION
    assert secret not in output.err
    assert secret not in output.out


def test_unknown_command_exits_2() -> None:
    assert main(["no-such-command"]) == 2


@pytest.fixture(scope="module")
def publish_broker() -> Iterator[RunningBroker]:
    with run_broker(entities=[PUBLISH_QUEUE]) as running:
        yield running


@pytest.fixture
def publish_env(
    publish_broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> RunningBroker:
    """The shared broker, with `publish` pointed at `PUBLISH_QUEUE`."""
    monkeypatch.setenv(
        "ORDERS_CONSUMER_CONNECTION_STRING", publish_broker.connection_string
    )
    monkeypatch.setenv("ORDERS_CONSUMER_ENTITY", PUBLISH_QUEUE)
    return publish_broker


def assert_queue_empty(broker: RunningBroker) -> None:
    asyncio.run(
        receive_sessions(broker.connection_string, PUBLISH_QUEUE, {}, check_empty=True)
    )


def write_events(path: Path, second_line: str) -> None:
    """Write a valid event on line 1, a blank line 2 and `second_line` as line 3."""
    first = json.dumps(make_event("ORDER_CREATED", "ORD-1"))
    path.write_text(f"{first}\n\n{second_line}\n", encoding="utf-8")


def test_publish_long_order_id_exits_2(
    publish_env: RunningBroker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "events.jsonl"
    write_events(path, json.dumps(make_event("ORDER_CREATED", "O" * 200)))

    code = main(["publish", str(path)])

    error = capsys.readouterr().err
    assert code == EXIT_CONFIGURATION
    assert f"{path}:3: payload.orderId is 200 characters long" in error
    assert "Traceback" not in error
    assert_queue_empty(publish_env)


@pytest.mark.parametrize(
    ("literal", "problem"),
    [
        ("NaN", "NaN is not valid JSON"),
        ("Infinity", "Infinity is not valid JSON"),
        ("-Infinity", "-Infinity is not valid JSON"),
        ("1e400", "number '1e400' is outside the range of a double"),
    ],
)
def test_publish_non_finite_number_exits_2(
    publish_env: RunningBroker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    literal: str,
    problem: str,
) -> None:
    path = tmp_path / "events.jsonl"
    event = json.dumps(make_event("PAYMENT_CAPTURED", "ORD-2"))
    write_events(path, event.replace('"amount": 10.0', f'"amount": {literal}'))

    code = main(["publish", str(path)])

    error = capsys.readouterr().err
    assert code == EXIT_CONFIGURATION
    assert f"{path}:3: invalid JSON: {problem}" in error
    assert_queue_empty(publish_env)


def test_publish_valid_file_sends_all(
    publish_env: RunningBroker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "events.jsonl"
    write_events(path, json.dumps(make_event("ORDER_CREATED", "ORD-3")))

    code = main(["publish", str(path)])

    assert code == 0
    assert f"published 2 events to {PUBLISH_QUEUE}" in capsys.readouterr().out
    expected = {"ORD-1": 1, "ORD-3": 1}
    asyncio.run(
        receive_sessions(
            publish_env.connection_string, PUBLISH_QUEUE, expected, check_empty=True
        )
    )
