"""The orders-consumer command line: exit codes and output."""

from __future__ import annotations

import json

import pytest

from consumer.cli import EXIT_CONFIGURATION, main


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
