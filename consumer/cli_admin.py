"""The `dlq` and `sessions` command groups of `orders-consumer`.

`dlq_cli` and `sessions_cli` are typer apps for `cli.add_typer(dlq_cli, name="dlq")`
and `cli.add_typer(sessions_cli, name="sessions")`. Every command reads the same
configuration as `run`: `--env` selects `config/<env>.yaml`, and `ORDERS_CONSUMER_*`
environment variables override it.

Exit codes: 0 on success, 1 when an operation failed or was rejected for at least one
order, 2 for invalid configuration. Error text is printed without a traceback and with
secrets removed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, TypeVar

import typer
from azure.servicebus.aio import ServiceBusClient
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from consumer.config import Settings, load_settings
from consumer.dlq import (
    DeadLetteredMessage,
    DeadLetterQueue,
    DeadLetterToolError,
    Selection,
    open_client,
    render_body,
)
from consumer.errors import ConfigurationError, TransportError
from consumer.redact import redact
from consumer.sessions_admin import (
    ResubmitResult,
    SessionLocked,
    hold_session,
    read_state,
    resubmit_order,
    unpark,
)
from consumer.terminal import LINE_BREAKS, escape_controls

EXIT_FAILED = 1
EXIT_CONFIGURATION = 2
T = TypeVar("T")

dlq_cli = typer.Typer(
    help="Inspect, resubmit and purge dead-lettered messages of the consumed entity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
sessions_cli = typer.Typer(
    help="List parked orders and resume them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EnvOption = Annotated[
    str,
    typer.Option(help="Environment: dev, sit or prod (selects config/ENV.yaml)."),
]
ReasonOption = Annotated[
    str | None, typer.Option("--reason", help="Only messages with this reason.")
]
OrderOption = Annotated[
    str | None, typer.Option("--order", help="Only messages of this order id.")
]


def _fail(message: str, code: int, *, multiline: bool = False) -> typer.Exit:
    # Error messages quote order ids and other values that producers chose, so
    # control characters are escaped. Only multi-line messages of our own, such as
    # the list of invalid settings, keep their line breaks.
    text = escape_controls(redact(message), LINE_BREAKS if multiline else "")
    typer.echo(f"error: {text}", err=True)
    return typer.Exit(code)


def _run(settings: Settings, work: Callable[..., Awaitable[T]]) -> T:
    """Run `work(client)` on a new client; turn tool errors into exit codes."""

    async def main() -> T:
        async with open_client(settings) as client:
            return await work(client)

    try:
        return asyncio.run(main())
    except ConfigurationError as error:
        raise _fail(str(error), EXIT_CONFIGURATION, multiline=True) from None
    except (DeadLetterToolError, TransportError) as error:
        raise _fail(str(error), EXIT_FAILED) from None


def _settings(env: str) -> Settings:
    try:
        return load_settings(env)
    except ConfigurationError as error:
        raise _fail(str(error), EXIT_CONFIGURATION, multiline=True) from None


@contextmanager
def _progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Show a progress bar on stderr and yield a function that advances it."""
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda count: progress.advance(task, count)


def _cell(text: str) -> Text:
    """Return a table cell that shows `text` literally: no markup, no control codes."""
    # Rich parses a `str` cell for markup such as `[bold]` or `[link=...]`, but prints
    # a `Text` as it is.
    return Text(escape_controls(text))


def _stdout() -> Console:
    # A wide console keeps table rows on one line when the output is piped.
    return Console(width=200) if not Console().is_terminal else Console()


# `sessions list` waits this long per order, because a held session will not free up.
LIST_SESSION_WAIT_S = 1.0
LOCKED_STATUS = "locked by a consumer"
PARKED_STATUS = "parked"


@dataclass(frozen=True)
class ParkedOrder:
    """A row of `sessions list`: an order that is parked or could not be checked."""

    order_id: str
    status: str
    reason: str
    description: str
    sequence_number: int | None
    deferred: int | None


async def list_parked(
    client: ServiceBusClient, settings: Settings
) -> list[ParkedOrder]:
    """Return the parked orders, found through their dead-lettered messages.

    Each order with a dead-lettered message is checked by reading its session state.
    An order whose session is locked by a running consumer is listed as
    "locked by a consumer".
    """
    by_order: dict[str, list[DeadLetteredMessage]] = {}
    for message in await DeadLetterQueue(client, settings).peek():
        by_order.setdefault(message.order_id, []).append(message)
    rows: list[ParkedOrder] = []
    for order_id, messages in by_order.items():
        if not order_id:
            continue
        row = await _parked_row(client, settings, order_id, messages[0])
        if row is not None:
            rows.append(row)
    return rows


async def _parked_row(
    client: ServiceBusClient,
    settings: Settings,
    order_id: str,
    first: DeadLetteredMessage,
) -> ParkedOrder | None:
    try:
        async with hold_session(
            client, settings, order_id, LIST_SESSION_WAIT_S
        ) as receiver:
            state = await read_state(receiver)
    except SessionLocked:
        return ParkedOrder(
            order_id, LOCKED_STATUS, first.reason, first.description, None, None
        )
    parked = state.checkpoint.parked
    if parked is None:
        return None
    return ParkedOrder(
        order_id,
        PARKED_STATUS,
        parked.reason,
        parked.description,
        parked.sequence_number,
        len(state.checkpoint.deferred_sequence_numbers),
    )


async def resubmit_records(
    client: ServiceBusClient,
    settings: Settings,
    records: list[DeadLetteredMessage],
    progress: Callable[[int], None] | None = None,
) -> list[ResubmitResult | DeadLetterToolError]:
    """Resubmit the dead-lettered `records`, order by order.

    Orders are processed in the order of their oldest dead-lettered message, and the
    messages of one order together, oldest first. A failure of one order (locked,
    rejected) is returned in its place and the other orders go on.
    """
    by_order: dict[str, list[int]] = {}
    for record in records:
        by_order.setdefault(record.order_id, []).append(record.sequence_number)
    outcomes: list[ResubmitResult | DeadLetterToolError] = []
    for order_id, numbers in by_order.items():
        if not order_id:
            outcomes.append(
                DeadLetterToolError(
                    f"dead-lettered messages {numbers} have no session id, so they "
                    "belong to no order and cannot be resubmitted into one"
                )
            )
            continue
        try:
            outcomes.append(await resubmit_order(client, settings, order_id, numbers))
        except DeadLetterToolError as error:
            outcomes.append(error)
        if progress is not None:
            progress(len(numbers))
    return outcomes


@dlq_cli.command("list")
def list_messages(
    env: EnvOption = "dev", reason: ReasonOption = None, order: OrderOption = None
) -> None:
    """List dead-lettered messages without locking them (peek)."""
    settings = _settings(env)
    selection = Selection(reason=reason, order_id=order)

    async def work(client: ServiceBusClient) -> list[DeadLetteredMessage]:
        return await DeadLetterQueue(client, settings).peek(selection)

    messages = _run(settings, work)
    table = Table(
        "order", "event type", "reason", "description", "enqueued", "deliveries", "seq"
    )
    for message in messages:
        enqueued = message.enqueued_at.isoformat() if message.enqueued_at else ""
        table.add_row(
            _cell(message.order_id),
            _cell(message.event_type),
            _cell(message.reason),
            _cell(message.description),
            enqueued,
            str(message.delivery_count),
            str(message.sequence_number),
        )
    console = _stdout()
    console.print(table)
    console.print(f"{len(messages)} dead-lettered message(s)")


@dlq_cli.command()
def show(
    sequence_number: Annotated[
        int, typer.Argument(metavar="SEQ", help="Sequence number of the message.")
    ],
    env: EnvOption = "dev",
) -> None:
    """Print one dead-lettered message: its properties and its body."""
    settings = _settings(env)

    async def work(client: ServiceBusClient) -> DeadLetteredMessage | None:
        return await DeadLetterQueue(client, settings).find(sequence_number)

    message = _run(settings, work)
    if message is None:
        raise _fail(
            f"no dead-lettered message with sequence number {sequence_number}; "
            "see `dlq list`",
            EXIT_FAILED,
        )
    rows = {
        "sequence number": message.sequence_number,
        "order": message.order_id,
        "message id": message.message_id,
        "event type": message.event_type,
        "reason": message.reason,
        "description": message.description,
        "enqueued": message.enqueued_at.isoformat() if message.enqueued_at else "",
        "delivery count": message.delivery_count,
        "correlation id": message.correlation_id or "",
        "content type": message.content_type or "",
    }
    for name, value in rows.items():
        typer.echo(f"{name + ':':18}{escape_controls(str(value))}")
    typer.echo("application properties:")
    for key, value in sorted(message.user_properties().items()):
        typer.echo(f"  {escape_controls(key)}: {escape_controls(str(value))}")
    typer.echo("body:")
    typer.echo(render_body(message.body))


@dlq_cli.command()
def resubmit(
    env: EnvOption = "dev",
    reason: ReasonOption = None,
    order: OrderOption = None,
    seq: Annotated[
        list[int] | None,
        typer.Option(help="Sequence number of a message; repeat for several."),
    ] = None,
) -> None:
    """Send dead-lettered messages back into their order's session, in order.

    A message is rejected when its order is not parked and the consumer already
    handled a later message of that order.
    """
    if reason is None and order is None and not seq:
        raise _fail("choose messages with --order, --reason or --seq", EXIT_FAILED)
    settings = _settings(env)
    selection = Selection(reason, order, frozenset(seq or ()))

    async def work(
        client: ServiceBusClient,
    ) -> list[ResubmitResult | DeadLetterToolError]:
        found = await DeadLetterQueue(client, settings).peek(selection)
        with _progress("resubmitting", len(found)) as advance:
            return await resubmit_records(client, settings, found, advance)

    outcomes = _run(settings, work)
    _report(outcomes, "resubmitted")


def _report(outcomes: list[ResubmitResult | DeadLetterToolError], verb: str) -> None:
    failures = 0
    for outcome in outcomes:
        if isinstance(outcome, DeadLetterToolError):
            failures += 1
            typer.echo(f"error: {escape_controls(redact(str(outcome)))}", err=True)
            continue
        numbers = outcome.resubmitted or outcome.skipped
        resumed = "; order resumed" if outcome.unparked else ""
        order_id = escape_controls(outcome.order_id)
        typer.echo(f"order {order_id}: {verb} {list(numbers)}{resumed}")
    if not outcomes:
        typer.echo("no matching dead-lettered messages")
    if failures:
        raise typer.Exit(EXIT_FAILED)


@dlq_cli.command()
def purge(
    env: EnvOption = "dev",
    reason: ReasonOption = None,
    order: OrderOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask to confirm.")] = False,
) -> None:
    """Remove dead-lettered messages for good (all of them without filters)."""
    settings = _settings(env)
    selection = Selection(reason=reason, order_id=order)

    async def count(client: ServiceBusClient) -> int:
        return len(await DeadLetterQueue(client, settings).peek(selection))

    total = _run(settings, count)
    if total == 0:
        typer.echo("no matching dead-lettered messages")
        return
    if not yes:
        typer.confirm(f"Remove {total} dead-lettered message(s) for good?", abort=True)

    async def work(client: ServiceBusClient) -> int:
        with _progress("purging", total) as advance:
            queue = DeadLetterQueue(client, settings)
            return await queue.purge(selection, advance, limit=total)

    removed = _run(settings, work)
    typer.echo(f"removed {removed} dead-lettered message(s)")


@sessions_cli.command("list")
def list_sessions(env: EnvOption = "dev") -> None:
    """List parked orders with the reason they stopped."""
    settings = _settings(env)

    async def work(client: ServiceBusClient) -> list[ParkedOrder]:
        return await list_parked(client, settings)

    rows = _run(settings, work)
    table = Table(
        "order", "status", "reason", "description", "parked at seq", "deferred"
    )
    for row in rows:
        table.add_row(
            _cell(row.order_id),
            row.status,
            _cell(row.reason),
            _cell(row.description),
            "" if row.sequence_number is None else str(row.sequence_number),
            "" if row.deferred is None else str(row.deferred),
        )
    console = _stdout()
    console.print(table)
    console.print(f"{len(rows)} parked or unchecked order(s)")


@sessions_cli.command("unpark")
def unpark_order(
    order_id: Annotated[str, typer.Argument(metavar="ORDER_ID")],
    env: EnvOption = "dev",
    skip: Annotated[
        bool,
        typer.Option(
            "--skip",
            help="Drop the dead-lettered message instead of resubmitting it.",
        ),
    ] = False,
) -> None:
    """Resume a parked order: its dead-lettered message first, then the rest."""
    settings = _settings(env)

    async def work(client: ServiceBusClient) -> ResubmitResult:
        return await unpark(client, settings, order_id, skip=skip)

    result = _run(settings, work)
    _report([result], "skipped" if skip else "resubmitted")
