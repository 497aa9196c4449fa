"""Fixtures of the local broker tests: the plugin's fixtures plus SDK clients."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.servicebus import ServiceBusClient

from localbus.pytest_plugin import (  # noqa: F401 - fixtures used by the tests
    local_broker,
    local_broker_process,
    pytest_configure,
)
from localbus.testing import RunningBroker

QUEUE = "orders.dev.events"
# azure-servicebus 7.15 leaves the socket of a handler whose open failed (an accept
# that timed out, a missing entity) to the garbage collector, which may run during
# any later test.
SDK_SOCKET_LEAK = pytest.mark.filterwarnings("ignore:unclosed <socket:ResourceWarning")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Apply the SDK socket-leak filter to the tests of this folder."""
    folder = Path(__file__).parent
    for item in items:
        if folder in Path(str(item.fspath)).parents:
            item.add_marker(SDK_SOCKET_LEAK)


@pytest.fixture(autouse=True)
def collect_leaked_sockets() -> Iterator[None]:
    """Collect the sockets the SDK leaked while this folder's filter applies.

    Otherwise the garbage collector may close them during a test of another folder
    on the same worker, where the ResourceWarning fails that test.
    """
    yield
    gc.collect()


@pytest.fixture
def client(local_broker: RunningBroker) -> Iterator[ServiceBusClient]:  # noqa: F811
    """A sync SDK client connected to the in-process broker."""
    with ServiceBusClient.from_connection_string(local_broker.connection_string) as sdk:
        yield sdk
