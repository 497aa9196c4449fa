"""The `orders-consumer` command: run, broker, publish, generate and demo.

Exit codes: 0 on success, including `run` stopped by SIGTERM or SIGINT, 1 when the
work failed (the broker stayed unreachable, the demo found a wrong count), 2 for
invalid configuration or arguments. A configuration error prints its message without a
traceback, and secrets are redacted from every error printed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer

from consumer.cli_admin import dlq_cli, sessions_cli
from consumer.errors import ConfigurationError, TransportError
from consumer.redact import redact
from consumer.terminal import LINE_BREAKS, escape_controls

EXIT_FAILED = 1
EXIT_CONFIGURATION = 2
# After SIGTERM or SIGINT, `ConsumerApp.run()` returns within shutdown_grace_s +
# SHUTDOWN_MARGIN_S. Stopping the operations server and the interpreter get this much
# more, after which the process exits whatever still runs.
EXIT_MARGIN_S = 1.0
WATCHDOG_INTERVAL_S = 0.5

log = structlog.get_logger("orders_consumer.cli")

cli = typer.Typer(
    name="orders-consumer",
    help="Session-ordered consumer for the Azure Service Bus order event stream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


cli.add_typer(dlq_cli, name="dlq")
cli.add_typer(sessions_cli, name="sessions")


def _fail(message: str, code: int, *, multiline: bool = False) -> typer.Exit:
    # Messages may quote input values, so control characters are escaped. Only
    # multi-line messages of our own, such as the list of invalid settings, keep
    # their line breaks.
    text = escape_controls(redact(message), LINE_BREAKS if multiline else "")
    typer.echo(f"error: {text}", err=True)
    return typer.Exit(code)


@cli.command()
def run(
    env: Annotated[
        str,
        typer.Option(help="Environment: dev, sit or prod (selects config/ENV.yaml)."),
    ] = "dev",
    until_idle: Annotated[
        float | None,
        typer.Option(
            help="Batch mode: exit once no session was available for this many seconds."
        ),
    ] = None,
) -> None:
    """Consume the configured entity with the bundled handlers until stopped."""
    from consumer.app import ConsumerApp
    from consumer.config import load_settings
    from consumer.http import OpsServer
    from consumer.logs import configure_logging
    from consumer.processor import BrokerUnavailable

    try:
        settings = load_settings(env)
        app = ConsumerApp(settings)
        store = _install_bundled_handlers(app)
    except ConfigurationError as error:
        raise _fail(str(error), EXIT_CONFIGURATION, multiline=True) from None
    configure_logging(settings.effective_log_format, settings.log_level)
    server = OpsServer(
        app.metrics.registry, app.health, settings.metrics_host, settings.metrics_port
    )
    server.start()
    _start_exit_watchdog(app)
    code = EXIT_FAILED
    try:
        asyncio.run(app.run(until_idle_s=until_idle))
        code = 0
    except (BrokerUnavailable, TransportError) as error:
        raise _fail(str(error), EXIT_FAILED) from None
    finally:
        server.stop()
        _exit_if_handler_threads_run(app, code)
        store.close()


def _start_exit_watchdog(
    app: Any, exit_process: Callable[[int], Any] = os._exit
) -> threading.Thread:
    """Start a thread that ends the process if it outlives the stop bound.

    The bound is `shutdown_grace_s + SHUTDOWN_MARGIN_S + EXIT_MARGIN_S` after the
    stop request. Past it, something that the asyncio shutdown cannot cancel keeps
    the process alive: a handler that blocks the event loop, or a DNS lookup that
    `asyncio.run` waits for at exit. The broker releases the sessions and messages
    still locked when the process exits and its connections drop, which is what a
    SIGKILL from Kubernetes would do later.
    """
    from consumer.app import SHUTDOWN_MARGIN_S

    def watch() -> None:
        while app.stop_requested_at is None:
            time.sleep(WATCHDOG_INTERVAL_S)
        bound_s = app.settings.shutdown_grace_s + SHUTDOWN_MARGIN_S + EXIT_MARGIN_S
        time.sleep(max(0.0, app.stop_requested_at + bound_s - time.monotonic()))
        log.error("shutdown_timed_out", bound_s=bound_s)
        sys.stdout.flush()
        sys.stderr.flush()
        exit_process(0)

    thread = threading.Thread(target=watch, name="exit-watchdog", daemon=True)
    thread.start()
    return thread


def _exit_if_handler_threads_run(app: Any, code: int) -> None:
    """Exit the process at once when sync handlers still run after the stop.

    The interpreter joins every thread of a ThreadPoolExecutor before it exits, so a
    handler blocked on I/O would hold the process past the stop bound, for as long as
    it blocks. Its message was abandoned when the grace period ended. `os._exit`
    skips that join and the store's close, which would wait for the same threads.
    SQLite rolls back the transaction the thread left open.
    """
    running = app.handler_threads_running
    if not running:
        return
    error = sys.exception()
    if error is not None and not isinstance(error, typer.Exit):
        # An unexpected error is on its way out, and os._exit would drop it unseen.
        traceback.print_exception(error)
        code = EXIT_FAILED
    log.warning("handler_threads_abandoned", threads=running, exit_code=code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _install_bundled_handlers(app: Any) -> Any:
    import handlers

    return handlers.install(app)


@cli.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def broker(context: typer.Context) -> None:
    """Run the local Service Bus-compatible broker (all arguments are forwarded)."""
    from localbus.cli import main as broker_main

    raise typer.Exit(broker_main(list(context.args)))


@cli.command()
def publish(
    file: Annotated[Path, typer.Argument(help="JSON lines file, one event a line.")],
    env: Annotated[str, typer.Option(help="Environment: dev, sit or prod.")] = "dev",
) -> None:
    """Publish events to the configured entity, with session id = payload.orderId.

    Every line is checked before the first send, so a file with an invalid line
    sends nothing.
    """
    from consumer.config import load_settings
    from consumer.generate import read_numbered_jsonl
    from consumer.publish import InvalidEventError, publish_messages_sync

    try:
        settings = load_settings(env)
    except ConfigurationError as error:
        raise _fail(str(error), EXIT_CONFIGURATION, multiline=True) from None
    try:
        lines = read_numbered_jsonl(file, max_depth=settings.max_json_depth)
    except (OSError, ValueError) as error:
        raise _fail(str(error), EXIT_CONFIGURATION) from None
    messages = _build_line_messages(file, lines)
    try:
        count = publish_messages_sync(settings, messages).messages
    except InvalidEventError as error:
        raise _fail(f"{file}: {error}", EXIT_CONFIGURATION) from None
    except TransportError as error:
        raise _fail(str(error), EXIT_FAILED) from None
    typer.echo(f"published {count} events to {settings.entity_name}")


def _build_line_messages(
    file: Path, lines: list[tuple[int, dict[str, Any]]]
) -> list[Any]:
    """Build the message of each (line number, event), naming the line in errors."""
    from consumer.publish import InvalidEventError, build_message

    messages: list[Any] = []
    for number, event in lines:
        try:
            messages.append(build_message(event))
        except InvalidEventError as error:
            raise _fail(f"{file}:{number}: {error}", EXIT_CONFIGURATION) from None
    return messages


@cli.command()
def generate(
    orders: Annotated[int, typer.Option(min=0, help="Number of orders.")] = 100,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same stream.")] = 1,
    out: Annotated[
        Path | None, typer.Option(help="Output file (JSON lines); stdout when unset.")
    ] = None,
) -> None:
    """Generate an interleaved order lifecycle event stream as JSON lines."""
    from consumer.generate import generate_stream, write_jsonl

    events = generate_stream(orders, seed)
    if out is None:
        import json

        for event in events:
            sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
        return
    count = write_jsonl(events, out)
    typer.echo(f"wrote {count} events of {orders} orders to {out}", err=True)


@cli.command()
def demo(
    orders: Annotated[int, typer.Option(min=1, help="Number of orders.")] = 300,
    seed: Annotated[int, typer.Option(help="Random seed of the stream.")] = 7,
    concurrency: Annotated[
        int, typer.Option(min=1, help="max_concurrent_sessions of the consumer.")
    ] = 16,
) -> None:
    """Run the local broker, publish generated orders, consume them and verify."""
    from consumer.demo import run_demo

    report = asyncio.run(run_demo(orders=orders, seed=seed, concurrency=concurrency))
    typer.echo(report.render())
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` (default `sys.argv[1:]`) and return the exit code."""
    try:
        cli(args=argv, prog_name="orders-consumer")
    except SystemExit as done:
        return _exit_code(done.code)
    except ConfigurationError as error:
        typer.echo(f"error: {redact(str(error))}", err=True)
        return EXIT_CONFIGURATION
    return 0


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    # sys.exit("text") prints the text and exits 1.
    typer.echo(redact(str(code)), err=True)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
