"""A chaos consumer process: the bundled handlers plus the journal handler.

Run as `python -m tests.chaos.consumer_main CONFIG_JSON` from the repository root, with
the connection string in `ORDERS_CONSUMER_CONNECTION_STRING` (never on the command
line, where `ps` would show it). The process consumes until SIGTERM or SIGINT, and
stops by itself when its parent process goes away, so a killed harness leaves no
consumer behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import handlers
from consumer.app import ConsumerApp
from consumer.config import load_settings
from consumer.errors import TransportError
from consumer.events import EVENT_TYPES
from consumer.logs import configure_logging
from consumer.processor import BrokerUnavailable
from tests.chaos.journal import HandlerFaults, JournalHandler

# How often the process checks that the harness that started it still runs.
PARENT_CHECK_INTERVAL_S = 1.0


async def _watch_parent(app: ConsumerApp, parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_CHECK_INTERVAL_S)
    app.stop()


def _print_task_stacks() -> None:
    """Print the stack of every asyncio task, to find where a stop hangs."""
    for task in asyncio.all_tasks():
        print(f"--- task {task.get_name()}", file=sys.stderr)
        task.print_stack(limit=30, file=sys.stderr)
    sys.stderr.flush()


async def _consume(app: ConsumerApp, parent_pid: int) -> None:
    # SIGUSR1 prints the task stacks; the harness sends it before it kills a
    # consumer that did not stop in time.
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _print_task_stacks)
    watcher = asyncio.create_task(_watch_parent(app, parent_pid))
    try:
        await app.run()
    finally:
        watcher.cancel()


def main(argv: list[str]) -> int:
    """Consume with the settings and handler faults in the JSON file `argv[0]`."""
    config: dict[str, Any] = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    parent_pid = os.getppid()
    settings = load_settings("dev", **config["settings"])
    configure_logging("json", settings.log_level, stream=sys.stderr)
    app = ConsumerApp(settings)
    journal = JournalHandler(
        Path(config["journal_dir"]), HandlerFaults.from_document(config["faults"])
    )
    for event_type in EVENT_TYPES:
        app.router.add_handler(event_type, journal.mark_start)
    store = handlers.install(app)
    for event_type in EVENT_TYPES:
        app.router.add_handler(event_type, journal.handle)
    try:
        asyncio.run(_consume(app, parent_pid))
    except (BrokerUnavailable, TransportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        journal.close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
