"""The `sessions` commands and the session-state format, against the local broker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner, Result

from consumer.checkpoint import ParkRecord, SessionCheckpoint
from consumer.cli_admin import (
    LOCKED_STATUS,
    PARKED_STATUS,
    list_parked,
    sessions_cli,
)
from consumer.dlq import open_client
from consumer.publish import publish_events
from consumer.sessions_admin import (
    SessionLocked,
    SessionState,
    UnparkRequest,
    hold_session,
    unpark,
)
from consumer.testing import make_event
from localbus.testing import RunningBroker, run_broker
from tests.test_dlq import (
    LIFECYCLE,
    QUEUE,
    consume,
    payment_rejected_scenario,
    peek_dead_letters,
    point_commands_at,
    session_state,
    tool_settings,
)


@pytest.fixture
def broker() -> Iterator[RunningBroker]:
    """A local broker on a free 127.0.0.1 port with one session queue, `QUEUE`."""
    with run_broker(entities=[QUEUE], lock_duration_s=30.0) as running:
        yield running


@pytest.fixture(scope="module")
def parked_broker() -> Iterator[RunningBroker]:
    """A broker after `payment_rejected_scenario`, for tests that change nothing."""
    with run_broker(entities=[QUEUE], lock_duration_s=30.0) as running:
        asyncio.run(payment_rejected_scenario(tool_settings(running.connection_string)))
        yield running


@pytest.fixture
def cli_env(broker: RunningBroker, monkeypatch: pytest.MonkeyPatch) -> RunningBroker:
    """A fresh broker that the commands' configuration points at."""
    point_commands_at(broker, monkeypatch)
    return broker


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(sessions_cli, args)


def test_list_shows_parked_orders(
    parked_broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_commands_at(parked_broker, monkeypatch)

    result = invoke(["list"])

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    [order_a] = [line for line in lines if "order-a" in line]
    assert PARKED_STATUS in order_a
    assert "PaymentRejected" in order_a
    [order_b] = [line for line in lines if "order-b" in line]
    assert "MalformedBody" in order_b
    assert "2 parked or unchecked order(s)" in result.stdout


async def test_list_reports_session_held_by_consumer(
    parked_broker: RunningBroker,
) -> None:
    settings = tool_settings(parked_broker.connection_string)

    async with open_client(settings) as holder, open_client(settings) as lister:
        async with hold_session(holder, settings, "order-a"):
            rows = await list_parked(lister, settings)

    by_order = {row.order_id: row for row in rows}
    assert by_order["order-a"].status == LOCKED_STATUS
    assert by_order["order-a"].reason == "PaymentRejected"
    assert by_order["order-b"].status == PARKED_STATUS


def test_unpark_resumes_order_in_sequence(cli_env: RunningBroker) -> None:
    settings = tool_settings(cli_env.connection_string)
    handlers = asyncio.run(payment_rejected_scenario(settings))
    # A later event arrives while no consumer has the parked order locked.
    later = make_event("ORDER_DELIVERED", "order-a")
    asyncio.run(publish_events(settings, [later]))

    result = invoke(["unpark", "order-a"])
    handlers.failures.clear()
    asyncio.run(consume(settings, handlers))

    assert result.exit_code == 0, result.output
    assert "order order-a: resubmitted" in result.stdout
    assert handlers.handled["order-a"] == [*LIFECYCLE, "ORDER_DELIVERED"]
    state = asyncio.run(session_state(settings, "order-a"))
    assert state.checkpoint.parked is None
    assert state.checkpoint.deferred_sequence_numbers == ()
    remaining = asyncio.run(peek_dead_letters(settings))
    assert [record.order_id for record in remaining] == ["order-b"]


def test_unpark_skip_drops_dead_letter(cli_env: RunningBroker) -> None:
    settings = tool_settings(cli_env.connection_string)
    handlers = asyncio.run(payment_rejected_scenario(settings))

    result = invoke(["unpark", "order-a", "--skip"])
    state = asyncio.run(session_state(settings, "order-a"))
    asyncio.run(consume(settings, handlers))

    assert result.exit_code == 0, result.output
    assert "order order-a: skipped" in result.stdout
    assert handlers.handled["order-a"] == ["ORDER_CREATED", "ORDER_SHIPPED"]
    remaining = asyncio.run(peek_dead_letters(settings))
    assert [record.order_id for record in remaining] == ["order-b"]
    # The tool's record of the request, as read before the consumer ran.
    assert state.checkpoint.parked is None
    assert state.unpark is not None
    assert state.unpark.skip is True


def test_unpark_order_not_parked_fails(
    parked_broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_commands_at(parked_broker, monkeypatch)

    result = invoke(["unpark", "order-z"])

    assert result.exit_code == 1
    assert "order order-z is not parked" in result.stderr


async def test_unpark_held_session_reports_lock(parked_broker: RunningBroker) -> None:
    settings = tool_settings(parked_broker.connection_string)

    async with open_client(settings) as holder, open_client(settings) as tool:
        async with hold_session(holder, settings, "order-a"):
            with pytest.raises(SessionLocked, match="locked by a consumer"):
                await unpark(tool, settings, "order-a")


def test_state_keeps_checkpoint_format() -> None:
    checkpoint = SessionCheckpoint(
        last_sequence_number=7,
        recent_message_ids=("m1", "m7"),
        parked=None,
        deferred_sequence_numbers=(12, 9),
    )
    request = UnparkRequest(
        requested_at="2026-12-04T16:00:00+00:00",
        skip=False,
        dead_lettered_sequence_numbers=(8,),
        resubmitted_message_ids=("m8",),
        resume_message_id="resume-1",
    )

    encoded = SessionState(checkpoint, request).encode()

    # The processor reads the same bytes and ignores the unpark record.
    assert SessionCheckpoint.decode(encoded) == checkpoint
    assert SessionState.decode(encoded) == SessionState(checkpoint, request)
    document = json.loads(encoded)
    assert document["unpark"]["resubmittedMessageIds"] == ["m8"]
    assert document["deferredSequenceNumbers"] == [12, 9]


def test_state_without_unpark_record_decodes() -> None:
    record = ParkRecord("m2", 2, "PaymentRejected", "declined")
    checkpoint = SessionCheckpoint(last_sequence_number=1, parked=record)

    state = SessionState.decode(checkpoint.encode())

    assert state.checkpoint == checkpoint
    assert state.unpark is None
    assert SessionState.decode(None) == SessionState(SessionCheckpoint())
