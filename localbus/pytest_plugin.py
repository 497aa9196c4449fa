"""Pytest fixtures that start a local broker.

Enable them with `pytest_plugins = ["localbus.pytest_plugin"]` in a conftest.py.
Options go in a marker on the test: `@pytest.mark.local_broker(lock_duration_s=2,
entities=["orders.test.events"])`; the same marker configures both fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from localbus.testing import (
    BrokerProcess,
    RunningBroker,
    run_broker,
    run_broker_process,
)

MARKER = "local_broker"


def pytest_configure(config: pytest.Config) -> None:
    """Register the `local_broker` marker for --strict-markers."""
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**options): run_broker options for the local_broker fixtures",
    )


def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker(MARKER)
    return dict(marker.kwargs) if marker is not None else {}


@pytest.fixture
def local_broker(request: pytest.FixtureRequest) -> Iterator[RunningBroker]:
    """Start an in-process broker on a free port and stop it after the test."""
    with run_broker(**_options(request)) as broker:
        yield broker


@pytest.fixture
def local_broker_process(
    request: pytest.FixtureRequest, tmp_path: Any
) -> Iterator[BrokerProcess]:
    """Start `python -m localbus` on a free port and stop it after the test."""
    options = _options(request)
    with run_broker_process(**options) as broker:
        yield broker
