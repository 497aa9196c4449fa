"""Command line of the local broker, also reached as `orders-consumer broker`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from proton.reactor import ApplicationEvent, EventInjector

from consumer.config import (
    LOCAL_BROKER_KEY,
    LOCAL_BROKER_KEY_NAME,
    local_connection_string,
)
from localbus.auth import SharedAccessKey
from localbus.config import (
    DEFAULT_ENTITY,
    DEFAULT_LOCK_DURATION_S,
    DEFAULT_MAX_DELIVERY_COUNT,
    BrokerConfigError,
    EntityConfig,
    load_emulator_config,
    queue_entities,
)
from localbus.server import (
    DEFAULT_IDLE_TIMEOUT_S,
    STOP_EVENT,
    BrokerHandler,
    create_container,
)
from localbus.state import BrokerState
from localbus.testing import BrokerOptions, open_journal

log = logging.getLogger("localbus")


def build_parser() -> argparse.ArgumentParser:
    """Describe the broker's command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m localbus",
        description="Local AMQP 1.0 broker that the azure-servicebus SDK can use "
        "in place of Azure Service Bus.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")

    parser.add_argument(
        "--port",
        type=int,
        default=5672,
        help="TCP port to listen on; 0 picks a free one",
    )

    parser.add_argument(
        "--entity",
        action="append",
        default=[],
        metavar="NAME",
        help=f"session-enabled queue to create (repeatable; default {DEFAULT_ENTITY})",
    )

    parser.add_argument(
        "--queue",
        action="append",
        default=[],
        metavar="NAME",
        help="queue without sessions to create (repeatable)",
    )

    parser.add_argument(
        "--lock-duration-s",
        type=float,
        default=DEFAULT_LOCK_DURATION_S,
        help="session and message lock duration in seconds",
    )

    parser.add_argument(
        "--max-delivery-count",
        type=int,
        default=DEFAULT_MAX_DELIVERY_COUNT,
        help="deliveries before a message is dead-lettered as MaxDeliveryCountExceeded",
    )

    parser.add_argument(
        "--config",
        type=Path,
        help="entities from a Service Bus emulator Config.json file",
    )

    parser.add_argument(
        "--data-dir",
        type=Path,
        help="keep entities, messages and session state in SQLite in this folder",
    )

    parser.add_argument(
        "--require-auth",
        action="store_true",
        help="reject CBS tokens not signed with the emulator's shared access key, "
        "and SASL PLAIN credentials other than its key name and key",
    )

    parser.add_argument(
        "--idle-timeout-s",
        type=_positive_seconds,
        default=DEFAULT_IDLE_TIMEOUT_S,
        help="advertised AMQP idle-time-out in seconds; a connection that sends "
        "nothing for twice as long is closed",
    )

    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )

    return parser


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds above 0, got {text}")
    return value


def entities_from_args(args: argparse.Namespace) -> list[EntityConfig]:
    """Collect the entities named on the command line and in `--config`."""
    entities: list[EntityConfig] = []
    if args.config is not None:
        entities.extend(
            load_emulator_config(
                args.config, args.lock_duration_s, args.max_delivery_count
            )
        )
    entities.extend(
        queue_entities(args.entity, args.lock_duration_s, args.max_delivery_count)
    )
    entities.extend(
        queue_entities(
            args.queue,
            args.lock_duration_s,
            args.max_delivery_count,
            requires_session=False,
        )
    )
    if not entities:
        entities = list(
            queue_entities(
                [DEFAULT_ENTITY], args.lock_duration_s, args.max_delivery_count
            )
        )
    return entities


def main(argv: list[str] | None = None) -> int:
    """Run the broker until SIGINT or SIGTERM; return the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("proton").setLevel(logging.WARNING)
    try:
        entities = entities_from_args(args)
        options = BrokerOptions(
            entities=tuple(entities),
            lock_duration_s=args.lock_duration_s,
            max_delivery_count=args.max_delivery_count,
            data_dir=args.data_dir,
            require_auth=args.require_auth,
            host=args.host,
            port=args.port,
            idle_timeout_s=args.idle_timeout_s,
        )
        state = BrokerState(options.entities, journal=open_journal(options))
    except BrokerConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return _serve(state, options)


def _serve(state: BrokerState, options: BrokerOptions) -> int:
    injector = EventInjector()

    def on_listening(port: int) -> None:
        # The key in this string is the emulator's public development key.
        print(local_connection_string(options.host, port), flush=True)

    handler = BrokerHandler(
        state,
        options.host,
        options.port,
        SharedAccessKey(LOCAL_BROKER_KEY_NAME, LOCAL_BROKER_KEY),
        require_auth=options.require_auth,
        on_listening=on_listening,
        idle_timeout_s=options.idle_timeout_s,
    )
    handler.injector = injector
    container = create_container(handler)
    container.selectable(injector)

    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("broker_signal_received signal=%s", signal.Signals(signum).name)
        injector.trigger(ApplicationEvent(STOP_EVENT))

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, request_stop)
    try:
        container.run()
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)
    if handler.listen_error is not None:
        print(
            f"error: cannot listen on {options.host}:{options.port}: "
            f"{handler.listen_error}; choose another --port",
            file=sys.stderr,
        )
        return 1
    log.info("broker_stopped")
    return 0
