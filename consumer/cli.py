"""The `orders-consumer` command: run, broker, publish, generate and demo.

Exit codes: 0 on success, 1 when the work failed (the broker stayed unreachable, the
demo found a wrong count), 2 for invalid configuration or arguments. A configuration
error prints its message without a traceback, and secrets are redacted from every
error printed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from consumer.cli_admin import dlq_cli, sessions_cli
from consumer.errors import ConfigurationError, TransportError
from consumer.redact import redact

EXIT_FAILED = 1
EXIT_CONFIGURATION = 2

cli = typer.Typer(
    name="orders-consumer",
    help="Session-ordered consumer for the Azure Service Bus order event stream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


cli.add_typer(dlq_cli, name="dlq")
cli.add_typer(sessions_cli, name="sessions")


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {redact(message)}", err=True)
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
        raise _fail(str(error), EXIT_CONFIGURATION) from None
    log_format = settings.log_format or ("console" if env == "dev" else "json")
    configure_logging(log_format, settings.log_level)
    server = OpsServer(
        app.metrics.registry, app.health, settings.metrics_host, settings.metrics_port
    )
    server.start()
    try:
        asyncio.run(app.run(until_idle_s=until_idle))
    except (BrokerUnavailable, TransportError) as error:
        raise _fail(str(error), EXIT_FAILED) from None
    finally:
        server.stop()
        store.close()


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
    """Publish events to the configured entity, with session id = payload.orderId."""
    from consumer.config import load_settings
    from consumer.generate import read_jsonl
    from consumer.publish import InvalidEventError, publish_events_sync

    try:
        settings = load_settings(env)
        events = read_jsonl(file)
    except (ConfigurationError, OSError, ValueError) as error:
        raise _fail(str(error), EXIT_CONFIGURATION) from None
    try:
        count = publish_events_sync(settings, events)
    except InvalidEventError as error:
        raise _fail(f"{file}: {error}", EXIT_CONFIGURATION) from None
    except TransportError as error:
        raise _fail(str(error), EXIT_FAILED) from None
    typer.echo(f"published {count} events to {settings.entity_name}")


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
