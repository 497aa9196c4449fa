"""The `dlq` commands against the local broker, with the real SDK and ConsumerApp.

Each scenario publishes order events, consumes them with a real `ConsumerApp` whose
handlers fail on purpose for chosen (order, event type) pairs, and then runs the
command line on the resulting dead-letter queue. The command tests are plain
functions because the commands call `asyncio.run` themselves.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from consumer import DeadLetter, EventContext
from consumer.app import ConsumerApp
from consumer.cli_admin import dlq_cli
from consumer.config import Settings
from consumer.dlq import DeadLetterQueue, open_client
from consumer.events import EVENT_TYPES
from consumer.publish import build_messages, build_raw_message, publish_messages
from consumer.sessions_admin import SessionState, hold_session, read_state
from consumer.testing import make_event
from localbus.testing import RunningBroker, run_broker

QUEUE = "orders.tools.events"


@pytest.fixture
def broker() -> Iterator[RunningBroker]:
    """A local broker on a free 127.0.0.1 port with one session queue, `QUEUE`."""
    with run_broker(entities=[QUEUE], lock_duration_s=30.0) as running:
        yield running


def point_commands_at(broker: RunningBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Configure the commands for `broker` through environment variables."""
    monkeypatch.setenv("ORDERS_CONSUMER_CONNECTION_STRING", broker.connection_string)
    monkeypatch.setenv("ORDERS_CONSUMER_ENTITY", QUEUE)


@pytest.fixture
def cli_env(broker: RunningBroker, monkeypatch: pytest.MonkeyPatch) -> RunningBroker:
    """A fresh broker that the commands' configuration points at."""
    point_commands_at(broker, monkeypatch)
    return broker


@pytest.fixture(scope="module")
def scenario_broker() -> Iterator[RunningBroker]:
    """A broker after `payment_rejected_scenario`, shared by read-only tests."""
    with run_broker(entities=[QUEUE], lock_duration_s=30.0) as running:
        asyncio.run(payment_rejected_scenario(tool_settings(running.connection_string)))
        yield running


@pytest.fixture
def scenario_env(
    scenario_broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> RunningBroker:
    """The shared scenario broker, with the commands pointed at it."""
    point_commands_at(scenario_broker, monkeypatch)
    return scenario_broker


def tool_settings(connection_string: str, **overrides: Any) -> Settings:
    """Return settings for a fast consumer run and for the tools on `QUEUE`."""
    values: dict[str, Any] = {
        "env": "dev",
        "connection_string": connection_string,
        "entity": QUEUE,
        "session_idle_timeout_s": 0.2,
        "accept_timeout_s": 0.5,
        "retry_attempts": 1,
        "retry_backoff_s": 0.01,
        "retry_max_backoff_s": 0.01,
        "max_delivery_count": 5,
        "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class OrderHandlers:
    """A handler for every event type that fails for chosen (order, type) pairs."""

    failures: dict[tuple[str, str], BaseException] = field(default_factory=dict)
    handled: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    async def __call__(self, event: Any, ctx: EventContext) -> None:
        failure = self.failures.get((ctx.order_id, ctx.event_type))
        if failure is not None:
            raise failure
        self.handled[ctx.order_id].append(ctx.event_type)


async def consume(settings: Settings, handlers: OrderHandlers) -> None:
    """Run a real ConsumerApp until no session is left, failing after 60 s."""
    app = ConsumerApp(settings)
    for event_type in EVENT_TYPES:
        app.router.add_handler(event_type, handlers)
    await asyncio.wait_for(app.run(until_idle_s=1.0), timeout=60)


LIFECYCLE = ("ORDER_CREATED", "PAYMENT_CAPTURED", "ORDER_SHIPPED")


def lifecycle(order_id: str) -> list[dict[str, Any]]:
    """Return three events of one order, in publish order."""
    return [make_event(event_type, order_id) for event_type in LIFECYCLE]


async def payment_rejected_scenario(
    settings: Settings, order_id: str = "order-a"
) -> OrderHandlers:
    """Dead-letter the payment of `order_id` and a malformed body of order-b."""
    handlers = OrderHandlers()
    handlers.failures[(order_id, "PAYMENT_CAPTURED")] = DeadLetter(
        "PaymentRejected", "card issuer declined the capture"
    )
    messages = build_messages(lifecycle(order_id))
    messages.append(build_raw_message(b"{not json", "order-b"))
    await publish_messages(settings, messages)
    await consume(settings, handlers)
    return handlers


async def peek_dead_letters(settings: Settings) -> list[Any]:
    async with open_client(settings) as client:
        return await DeadLetterQueue(client, settings).peek()


def order_dead_letters(settings: Settings, order_id: str) -> list[Any]:
    """Return the dead-lettered messages of `order_id`, oldest first."""
    records = asyncio.run(peek_dead_letters(settings))
    return [record for record in records if record.order_id == order_id]


async def session_state(settings: Settings, order_id: str) -> SessionState:
    async with open_client(settings) as client:
        async with hold_session(client, settings, order_id) as receiver:
            return await read_state(receiver)


def invoke(args: list[str], input_text: str | None = None) -> Result:
    return CliRunner().invoke(dlq_cli, args, input=input_text)


def test_list_shows_reasons(scenario_env: RunningBroker) -> None:
    result = invoke(["list"])

    assert result.exit_code == 0, result.output
    assert "PaymentRejected" in result.stdout
    assert "card issuer declined" in result.stdout
    assert "MalformedBody" in result.stdout
    assert "order-a" in result.stdout
    assert "PAYMENT_CAPTURED" in result.stdout
    assert "2 dead-lettered message(s)" in result.stdout


def test_list_filters_by_reason_and_order(scenario_env: RunningBroker) -> None:
    by_reason = invoke(["list", "--reason", "MalformedBody"])
    by_order = invoke(["list", "--order", "order-a"])

    assert "order-b" in by_reason.stdout
    assert "order-a" not in by_reason.stdout
    assert "1 dead-lettered message(s)" in by_reason.stdout
    assert "PaymentRejected" in by_order.stdout
    assert "MalformedBody" not in by_order.stdout


def test_list_leaves_messages_unlocked(scenario_env: RunningBroker) -> None:
    settings = tool_settings(scenario_env.connection_string)

    invoke(["list"])
    second = invoke(["list"])

    # Peeking takes no lock and adds no delivery: the counts stay as they were.
    assert "2 dead-lettered message(s)" in second.stdout
    records = asyncio.run(peek_dead_letters(settings))
    assert [record.delivery_count for record in records] == [0, 0]


def test_show_prints_message(scenario_env: RunningBroker) -> None:
    settings = tool_settings(scenario_env.connection_string)
    [payment] = [
        record
        for record in asyncio.run(peek_dead_letters(settings))
        if record.reason == "PaymentRejected"
    ]

    result = invoke(["show", str(payment.sequence_number)])

    assert result.exit_code == 0, result.output
    assert f"message id:       {payment.message_id}" in result.stdout
    assert "reason:           PaymentRejected" in result.stdout
    assert "card issuer declined the capture" in result.stdout
    # The body is pretty-printed JSON, one key a line.
    assert '  "eventType": "PAYMENT_CAPTURED",' in result.stdout
    assert '    "orderId": "order-a",' in result.stdout


def test_show_unknown_sequence_number_fails(scenario_env: RunningBroker) -> None:
    result = invoke(["show", "999"])

    assert result.exit_code == 1
    assert "no dead-lettered message with sequence number 999" in result.stderr


def test_resubmit_keeps_order_sequence(cli_env: RunningBroker) -> None:
    settings = tool_settings(cli_env.connection_string)
    handlers = asyncio.run(payment_rejected_scenario(settings))
    assert handlers.handled["order-a"] == ["ORDER_CREATED"]
    [original] = order_dead_letters(settings, "order-a")

    # First resubmit: the payment fails again, so the copy is dead-lettered in turn.
    first = invoke(["resubmit", "--seq", str(original.sequence_number)])
    asyncio.run(consume(settings, handlers))
    [copy] = order_dead_letters(settings, "order-a")
    # Second resubmit, of the copy: now the payment goes through.
    second = invoke(["resubmit", "--order", "order-a"])
    handlers.failures.clear()
    asyncio.run(consume(settings, handlers))

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert "order order-a: resubmitted" in second.stdout
    assert "order resumed" in second.stdout
    assert handlers.handled["order-a"] == list(LIFECYCLE)
    assert order_dead_letters(settings, "order-a") == []
    assert order_dead_letters(settings, "order-b") != []
    state = asyncio.run(session_state(settings, "order-a"))
    assert state.checkpoint.parked is None
    assert state.checkpoint.deferred_sequence_numbers == ()
    assert copy.sequence_number > original.sequence_number
    assert copy.message_id == original.message_id
    assert copy.event_type == original.event_type
    assert copy.correlation_id == original.correlation_id
    assert copy.content_type == original.content_type
    assert copy.body == original.body
    resubmitted_from = copy.application_properties["orders-consumer-resubmitted-from"]
    assert resubmitted_from == original.sequence_number
    assert copy.original_sequence_number == original.sequence_number


def test_resubmit_rejects_jump_past_checkpoint(cli_env: RunningBroker) -> None:
    settings = tool_settings(cli_env.connection_string, poison_policy="continue")
    handlers = asyncio.run(payment_rejected_scenario(settings))
    # With `continue`, the shipment ran after the payment was dead-lettered.
    assert handlers.handled["order-a"] == ["ORDER_CREATED", "ORDER_SHIPPED"]

    result = invoke(["resubmit", "--order", "order-a"])

    assert result.exit_code == 1
    assert "would jump ahead of the order's checkpoint" in result.stderr
    assert "order-a" in result.stderr
    remaining = asyncio.run(peek_dead_letters(settings))
    assert sorted(record.order_id for record in remaining) == ["order-a", "order-b"]


def test_resubmit_needs_a_filter() -> None:
    result = invoke(["resubmit"])

    assert result.exit_code == 1
    assert "--order, --reason or --seq" in result.stderr


def test_purge_asks_for_confirmation(scenario_env: RunningBroker) -> None:
    settings = tool_settings(scenario_env.connection_string)

    declined = invoke(["purge"], input_text="n\n")

    assert declined.exit_code != 0
    assert "Remove 2 dead-lettered message(s) for good?" in declined.stdout
    assert len(asyncio.run(peek_dead_letters(settings))) == 2


def test_purge_by_reason_then_all(cli_env: RunningBroker) -> None:
    settings = tool_settings(cli_env.connection_string)
    asyncio.run(payment_rejected_scenario(settings))

    by_reason = invoke(["purge", "--reason", "MalformedBody"], input_text="y\n")
    remaining = asyncio.run(peek_dead_letters(settings))
    everything = invoke(["purge", "--yes"])

    assert by_reason.exit_code == 0, by_reason.output
    assert "removed 1 dead-lettered message(s)" in by_reason.stdout
    assert [record.reason for record in remaining] == ["PaymentRejected"]
    assert everything.exit_code == 0, everything.output
    assert "removed 1 dead-lettered message(s)" in everything.stdout
    assert asyncio.run(peek_dead_letters(settings)) == []
    assert invoke(["purge", "--yes"]).stdout == "no matching dead-lettered messages\n"


def test_invalid_configuration_exits_2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No Endpoint: the SDK rejects the string while parsing, before any connection.
    secret = "SharedAccessKeyName=tools;SharedAccessKey=do-not-print-me"
    monkeypatch.setenv("ORDERS_CONSUMER_CONNECTION_STRING", secret)

    result = invoke(["list"])

    assert result.exit_code == 2
    assert "invalid connection_string" in result.stderr
    assert "do-not-print-me" not in result.output
    assert "Traceback" not in result.output


def test_missing_broker_setting_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORDERS_CONSUMER_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("ORDERS_CONSUMER_FULLY_QUALIFIED_NAMESPACE", raising=False)

    result = invoke(["list", "--env", "prod"])

    assert result.exit_code == 2
    assert "no broker configured" in result.stderr
    assert "Traceback" not in result.output
