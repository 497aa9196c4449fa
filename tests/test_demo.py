"""The demo end to end on the local broker, with a small stream."""

from __future__ import annotations

from consumer.demo import run_demo
from tests.conftest import SDK_SOCKET_LEAKS

pytestmark = SDK_SOCKET_LEAKS


async def test_demo_handles_every_event_in_order() -> None:
    report = await run_demo(orders=20, seed=3, concurrency=8)

    assert report.ordering_errors == ()
    assert report.dead_lettered == 0
    assert report.handled == report.published
    assert report.ok
    assert "result: OK" in report.render()
