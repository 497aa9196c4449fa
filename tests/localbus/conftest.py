"""Fixtures of the local broker tests: the plugin's fixtures plus SDK clients."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from azure.servicebus import ServiceBusClient

from localbus.pytest_plugin import (  # noqa: F401 - fixtures used by the tests
    local_broker,
    local_broker_process,
    pytest_configure,
)
from localbus.testing import RunningBroker

QUEUE = "orders.dev.events"


@pytest.fixture
def client(local_broker: RunningBroker) -> Iterator[ServiceBusClient]:  # noqa: F811
    """A sync SDK client connected to the in-process broker."""
    with ServiceBusClient.from_connection_string(local_broker.connection_string) as sdk:
        yield sdk
