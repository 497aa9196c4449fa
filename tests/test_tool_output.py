"""What `dlq` and `sessions` print for hostile dead-lettered messages.

Producers choose session ids, subjects and bodies. The commands must print them
literally: Rich markup stays visible, control characters appear as escapes such as
`\\x1b`, and a body the parser rejects (too deep, not UTF-8) is shown as raw text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner, Result

from consumer.cli_admin import dlq_cli, sessions_cli
from consumer.dlq import DeadLetteredMessage, render_body
from consumer.publish import build_raw_message, publish_messages
from consumer.terminal import escape_controls
from localbus.testing import RunningBroker, run_broker
from tests.test_dlq import (
    QUEUE,
    OrderHandlers,
    consume,
    peek_dead_letters,
    point_commands_at,
    tool_settings,
)

ANSI_ID = "X-\x1b[2J\x1b[31mRED"
MARKUP_ID = "X-[bold red]markup[/bold red]"
LINK_ID = "X-[link=https://example.invalid]click[/link]"
NEWLINE_ID = "X-line1\nFAKE"
HOSTILE_IDS = (ANSI_ID, MARKUP_ID, LINK_ID, NEWLINE_ID)
HOSTILE_SUBJECT = "[red]S\x1b[5mUBJ"
DEEP_ID = "DEEP-1"
DEEP_BODY = b'{"a":' * 5000 + b"1" + b"}" * 5000
BINARY_ID = "BIN-1"
BINARY_BODY = b'{"note":"\xff\xfe then \x1b[31m"}'


async def hostile_scenario(connection_string: str) -> None:
    """Dead-letter one malformed message per hostile id, a deep and a binary body."""
    settings = tool_settings(connection_string)
    messages = [
        build_raw_message(b"{not json", order_id, subject=HOSTILE_SUBJECT)
        for order_id in HOSTILE_IDS
    ]
    messages.append(build_raw_message(DEEP_BODY, DEEP_ID))
    messages.append(build_raw_message(BINARY_BODY, BINARY_ID))
    await publish_messages(settings, messages)
    await consume(settings, OrderHandlers())


@pytest.fixture(scope="module")
def hostile_broker() -> Iterator[RunningBroker]:
    """A broker after `hostile_scenario`, shared by tests that change nothing."""
    with run_broker(entities=[QUEUE], lock_duration_s=30.0) as running:
        asyncio.run(hostile_scenario(running.connection_string))
        yield running


@pytest.fixture
def hostile_env(
    hostile_broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> RunningBroker:
    """The shared hostile broker, with the commands pointed at it."""
    point_commands_at(hostile_broker, monkeypatch)
    return hostile_broker


def dead_letter_of(broker: RunningBroker, order_id: str) -> DeadLetteredMessage:
    settings = tool_settings(broker.connection_string)
    records = asyncio.run(peek_dead_letters(settings))
    [record] = [record for record in records if record.order_id == order_id]
    return record


def show(broker: RunningBroker, order_id: str) -> Result:
    record = dead_letter_of(broker, order_id)
    return CliRunner().invoke(dlq_cli, ["show", str(record.sequence_number)])


def test_dlq_list_prints_ids_literally(hostile_env: RunningBroker) -> None:
    result = CliRunner().invoke(dlq_cli, ["list"])

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout
    assert "X-\\x1b[2J\\x1b[31mRED" in result.stdout
    assert MARKUP_ID in result.stdout
    assert LINK_ID in result.stdout
    assert "X-line1\\nFAKE" in result.stdout
    assert "[red]S\\x1b[5mUBJ" in result.stdout
    assert "6 dead-lettered message(s)" in result.stdout


def test_sessions_list_prints_ids_literally(hostile_env: RunningBroker) -> None:
    result = CliRunner().invoke(sessions_cli, ["list"])

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout
    assert "X-\\x1b[2J\\x1b[31mRED" in result.stdout
    assert MARKUP_ID in result.stdout
    assert LINK_ID in result.stdout
    assert "X-line1\\nFAKE" in result.stdout
    assert "6 parked or unchecked order(s)" in result.stdout


def test_dlq_show_escapes_fields(hostile_env: RunningBroker) -> None:
    result = show(hostile_env, ANSI_ID)

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout
    assert "order:            X-\\x1b[2J\\x1b[31mRED" in result.stdout
    assert "event type:       [red]S\\x1b[5mUBJ" in result.stdout


def test_dlq_show_deep_body_as_raw_text(hostile_env: RunningBroker) -> None:
    result = show(hostile_env, DEEP_ID)

    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "not shown as JSON: JSON nesting depth 5000 exceeds" in result.stdout
    assert '{"a":{"a":{"a":' in result.stdout
    assert f"the body is {len(DEEP_BODY)} bytes" in result.stdout
    assert len(result.stdout) < 20_000


def test_dlq_show_non_utf8_body(hostile_env: RunningBroker) -> None:
    result = show(hostile_env, BINARY_ID)

    assert result.exit_code == 0, result.output
    assert "body is not valid UTF-8" in result.stdout
    assert "shown as \\xNN escapes" in result.stdout
    assert '{"note":"\\xff\\xfe then \\x1b[31m"}' in result.stdout
    assert "\ufffd" not in result.stdout
    assert "\x1b" not in result.stdout


def test_render_body_pretty_prints_json() -> None:
    text = render_body(b'{"orderId":"A-1","items":[1]}')

    assert text.startswith('{\n  "orderId": "A-1",')


def test_render_body_escapes_controls_in_json() -> None:
    # json.dumps escapes U+0000 to U+001F itself, but not C1 controls or bidi overrides.
    text = render_body('{"a":"\\u001b[2J \x9b31m \u202eevil"}'.encode())

    assert "\x9b" not in text
    assert "\u202e" not in text
    assert '"a": "\\u001b[2J \\x9b31m \\u202eevil"' in text


def test_render_body_cuts_long_json() -> None:
    body = b'{"a":"' + b"x" * 100 + b'"}'

    text = render_body(body, limit=50)

    first, note = text.split("\n... ")
    assert len(first) == 50
    assert note == f"(cut at 50 characters; the body is {len(body)} bytes)"


def test_render_body_cuts_four_byte_characters() -> None:
    # 40 characters of 4 bytes each: more than the decoded prefix of a 10-char limit.
    body = "\U0001f600".encode() * 40

    text = render_body(body, limit=10)

    [note, shown, cut] = text.split("\n")
    assert note.startswith("(not shown as JSON: body is not valid JSON")
    assert shown == "\U0001f600" * 10
    assert cut == "... (cut at 10 characters; the body is 160 bytes)"


def test_escape_controls_keeps_requested_characters() -> None:
    assert escape_controls("a\tb\nc\x1b") == "a\\tb\\nc\\x1b"
    assert escape_controls("a\tb\nc\x1b", keep="\n\t") == "a\tb\nc\\x1b"
    assert escape_controls("plain [bold] é") == "plain [bold] é"
