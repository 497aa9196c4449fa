"""Start a local broker from tests and tools, in-process or as a subprocess.

`run_broker()` runs the broker on its own thread and exposes `.state` for white-box
checks. `run_broker_process()` runs `python -m localbus` so a test can kill, terminate
and restart it on the same port and data directory. Both can cut client connections
and expire session locks on demand; the subprocess through its admin node
(`localbus.admin`), which `admin_client()` connects to.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from proton.reactor import ApplicationEvent, Container, EventInjector

from consumer.config import (
    LOCAL_BROKER_KEY,
    LOCAL_BROKER_KEY_NAME,
    local_connection_string,
)
from localbus.admin_client import AdminClient
from localbus.auth import SharedAccessKey
from localbus.config import (
    DEFAULT_ENTITY,
    DEFAULT_LOCK_DURATION_S,
    DEFAULT_MAX_DELIVERY_COUNT,
    EntityConfig,
    QueueConfig,
    QueueSettings,
)
from localbus.server import (
    CALL_EVENT,
    DEFAULT_IDLE_TIMEOUT_S,
    STOP_EVENT,
    BrokerHandler,
    create_container,
)
from localbus.state import BrokerState

START_TIMEOUT_S = 15.0
T = TypeVar("T")


@dataclass(frozen=True)
class BrokerOptions:
    """Options shared by the in-process and subprocess brokers."""

    entities: tuple[EntityConfig, ...]
    lock_duration_s: float = DEFAULT_LOCK_DURATION_S
    max_delivery_count: int = DEFAULT_MAX_DELIVERY_COUNT
    data_dir: Path | None = None
    require_auth: bool = False
    host: str = "127.0.0.1"
    port: int = 0
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S


def build_options(
    entities: Sequence[str | EntityConfig] | None = None,
    lock_duration_s: float = DEFAULT_LOCK_DURATION_S,
    max_delivery_count: int = DEFAULT_MAX_DELIVERY_COUNT,
    data_dir: str | Path | None = None,
    require_auth: bool = False,
    host: str = "127.0.0.1",
    port: int = 0,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
) -> BrokerOptions:
    """Turn entity names into session-enabled queues with the given lock settings."""
    settings = QueueSettings(
        lock_duration_s=lock_duration_s, max_delivery_count=max_delivery_count
    )
    configs: list[EntityConfig] = []
    for entity in entities or [DEFAULT_ENTITY]:
        if isinstance(entity, str):
            configs.append(QueueConfig(name=entity, settings=settings))
        else:
            configs.append(entity)
    return BrokerOptions(
        entities=tuple(configs),
        lock_duration_s=lock_duration_s,
        max_delivery_count=max_delivery_count,
        data_dir=Path(data_dir) if data_dir is not None else None,
        require_auth=require_auth,
        host=host,
        port=port,
        idle_timeout_s=idle_timeout_s,
    )


@dataclass
class RunningBroker:
    """A broker running on a thread of this process."""

    host: str
    port: int
    state: BrokerState
    _handler: BrokerHandler = field(repr=False)
    _container: Container = field(repr=False)
    _injector: EventInjector = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def connection_string(self) -> str:
        """Connection string for the SDK, with the emulator's well-known key."""
        return local_connection_string(self.host, self.port)

    def call(self, function: Callable[[], T], timeout_s: float = 10.0) -> T:
        """Run `function()` on the broker thread and return its result."""
        done = threading.Event()
        outcome: list[Any] = []

        def run() -> None:
            try:
                outcome.append((True, function()))
            except BaseException as error:  # handed back to the calling thread
                outcome.append((False, error))
            done.set()

        self._injector.trigger(ApplicationEvent(CALL_EVENT, subject=run))
        if not done.wait(timeout_s):
            raise TimeoutError(
                f"the broker thread did not run the call in {timeout_s}s"
            )
        succeeded, value = outcome[0]
        if not succeeded:
            raise value
        return cast(T, value)

    def cut_connections(self, entity: str | None = None) -> int:
        """Reset every client connection, or those with a link on `entity`, at once.

        Returns how many connections were cut. The clients see their sockets reset
        without AMQP close frames.
        """
        return self.call(lambda: self._handler.cut_connections(entity))

    def expire_session_locks(
        self, entity: str | None = None, session_id: str | None = None
    ) -> list[str]:
        """Expire the held session locks now, or only those of `entity`/`session_id`.

        Returns the ids of the expired sessions. Their receivers are detached with
        session-lock-lost, as when a lock runs out.
        """
        return self.call(lambda: self._handler.expire_session_locks(entity, session_id))

    def stop(self) -> None:
        """Stop the broker, closing every connection, and wait for its thread."""
        if not self._thread.is_alive():
            return
        self._injector.trigger(ApplicationEvent(STOP_EVENT))
        self._thread.join(timeout=10)


def open_journal(options: BrokerOptions) -> Any:
    """Return the SQLite journal for `options.data_dir`, or None for in-memory."""
    if options.data_dir is None:
        return None
    from localbus.sqlite_journal import SqliteJournal

    return SqliteJournal(options.data_dir)


def start_broker(options: BrokerOptions) -> RunningBroker:
    """Start a broker thread and return once it listens."""
    state = BrokerState(options.entities, journal=open_journal(options))
    listening = threading.Event()
    ports: list[int] = []

    def on_listening(port: int) -> None:
        ports.append(port)
        listening.set()

    handler = BrokerHandler(
        state,
        options.host,
        options.port,
        SharedAccessKey(LOCAL_BROKER_KEY_NAME, LOCAL_BROKER_KEY),
        require_auth=options.require_auth,
        on_listening=on_listening,
        idle_timeout_s=options.idle_timeout_s,
    )
    container = create_container(handler)
    injector = EventInjector()
    container.selectable(injector)
    handler.injector = injector
    thread = threading.Thread(target=container.run, name="localbus", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not listening.wait(0.05):
        if handler.listen_error is not None:
            raise RuntimeError(
                f"the local broker cannot listen on {options.host}:{options.port}: "
                f"{handler.listen_error}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the local broker did not start within {START_TIMEOUT_S}s"
            )
    return RunningBroker(
        options.host, ports[0], state, handler, container, injector, thread
    )


@contextlib.contextmanager
def run_broker(**options: Any) -> Iterator[RunningBroker]:
    """Run an in-process broker for the duration of the `with` block.

    Options: `entities` (names or `QueueConfig`/`TopicConfig`), `lock_duration_s`,
    `max_delivery_count`, `data_dir`, `require_auth`, `host`, `port` (0 picks a
    free port), `idle_timeout_s`.
    """
    broker = start_broker(build_options(**options))
    try:
        yield broker
    finally:
        broker.stop()


class BrokerProcess:
    """A `python -m localbus` subprocess that a test can kill and restart.

    `restart()` starts a new process on the same port and `--data-dir`, so clients
    reconnect to the same address and, with a data directory, find their messages.
    """

    def __init__(self, options: BrokerOptions, extra_args: Sequence[str] = ()) -> None:
        self.options = options
        self.host = options.host
        self.port = options.port
        self._extra_args = list(extra_args)
        self._process: subprocess.Popen[str] | None = None
        self.exit_status: int | None = None

    @property
    def connection_string(self) -> str:
        """Connection string for the SDK, with the emulator's well-known key."""
        return local_connection_string(self.host, self.port)

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, None when stopped."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the subprocess and wait until it prints its connection string."""
        command = [sys.executable, "-m", "localbus", *self._arguments()]
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        self._process = process
        assert process.stdout is not None
        line = _read_line(process, START_TIMEOUT_S)
        marker = f"sb://{self.host}:"
        if marker not in line:
            self.kill()
            raise RuntimeError(
                "the broker subprocess exited before it listened; "
                f"exit status {process.poll()}"
            )
        self.port = int(line.split(marker, 1)[1].split(";", 1)[0])

    def _arguments(self) -> list[str]:
        arguments = ["--host", self.host, "--port", str(self.port)]
        arguments += ["--lock-duration-s", str(self.options.lock_duration_s)]
        arguments += ["--max-delivery-count", str(self.options.max_delivery_count)]
        for entity in self.options.entities:
            if not isinstance(entity, QueueConfig):
                raise ValueError(
                    "run_broker_process takes queue names or QueueConfig, "
                    f"got {entity!r}; "
                    "describe topics in a Config.json passed as --config"
                )
            flag = "--entity" if entity.settings.requires_session else "--queue"
            arguments += [flag, entity.name]
        if self.options.data_dir is not None:
            arguments += ["--data-dir", str(self.options.data_dir)]
        if self.options.require_auth:
            arguments.append("--require-auth")
        arguments += ["--idle-timeout-s", str(self.options.idle_timeout_s)]
        return arguments + self._extra_args

    def cut_connections(self, entity: str | None = None) -> int:
        """Reset every client connection, or those with a link on `entity`, at once.

        Returns how many connections were cut. Raises `AdminError` when the broker
        does not respond.
        """
        with admin_client(self.host, self.port) as admin:
            return admin.cut_connections(entity)

    def expire_session_locks(
        self, entity: str | None = None, session_id: str | None = None
    ) -> list[str]:
        """Expire the held session locks now, or only those of `entity`/`session_id`.

        Returns the ids of the expired sessions.
        """
        with admin_client(self.host, self.port) as admin:
            return admin.expire_session_locks(entity, session_id)

    def kill(self) -> None:
        """Stop the broker with SIGKILL, as a crash would."""
        self._stop(signal.SIGKILL)

    def terminate(self) -> None:
        """Stop the broker with SIGTERM and wait for a clean exit."""
        self._stop(signal.SIGTERM)

    def restart(self) -> None:
        """Stop the broker if it runs, then start it again on the same port."""
        self.terminate()
        self.start()

    def _stop(self, signum: int) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signum)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
        self.exit_status = process.returncode
        self._process = None


def admin_client(host: str, port: int) -> AdminClient:
    """Connect to the admin node of a broker started with the emulator's key."""
    return AdminClient(
        host, port, SharedAccessKey(LOCAL_BROKER_KEY_NAME, LOCAL_BROKER_KEY)
    )


def _read_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        lines.append(process.stdout.readline())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    return lines[0] if lines else ""


@contextlib.contextmanager
def run_broker_process(**options: Any) -> Iterator[BrokerProcess]:
    """Run `python -m localbus` as a subprocess for the duration of the block.

    Takes the options of `run_broker`. With `port` 0 the first start picks a free
    port and `restart()` reuses it.
    """
    broker = BrokerProcess(build_options(**options))
    broker.start()
    try:
        yield broker
    finally:
        broker.terminate()
