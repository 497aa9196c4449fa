"""The session processor against the local broker: order, exactly once, concurrency."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import handlers
from consumer.app import ConsumerApp
from consumer.generate import generate_stream
from handlers.reference import project_stream
from tests.conftest import (
    SDK_SOCKET_LEAKS,
    Outgoing,
    Recorder,
    consume,
    dead_letters,
    expected_order,
    numbered,
    publish,
    settings_for,
)

pytestmark = [pytest.mark.slow, SDK_SOCKET_LEAKS]


STREAM_SEED = 11


def without_message_ids(projections: dict[str, Any]) -> dict[str, Any]:
    return {
        order_id: replace(projection, last_message_id=None)
        for order_id, projection in projections.items()
    }


@pytest.fixture(scope="module")
def stream() -> list[Outgoing]:
    """500 generated orders, fixed seed, message id = position in the stream."""
    return numbered(generate_stream(500, seed=STREAM_SEED))


# At concurrency 1 every message costs a receive, a session-state write, a complete
# and a peek in turn. The same 500 orders took 176 s at concurrency 1 in a script
# run on a 2-core machine shared with other test runs, so the bounds below only
# catch a run that hangs.
@pytest.mark.timeout(420)
@pytest.mark.parametrize("concurrency", [1, 8, 32])
async def test_stream_handled_once_in_order(
    broker: Any, stream: list[Outgoing], concurrency: int, tmp_path: Path
) -> None:
    await publish(broker.connection_string, stream)
    app = ConsumerApp(
        settings_for(
            broker.connection_string,
            max_concurrent_sessions=concurrency,
            session_idle_timeout_s=0.05,
            store_path=str(tmp_path / "projections.sqlite3"),
        )
    )
    recorder = Recorder()
    recorder.install(app)
    store = handlers.install(app)

    try:
        await consume(app, until_idle_s=1.0, timeout_s=360)
        projections = store.all()
    finally:
        store.close()

    # Message ids here are stream positions, the reference's are content hashes.
    reference = project_stream(generate_stream(500, seed=STREAM_SEED))
    assert without_message_ids(projections) == without_message_ids(reference)

    expected = expected_order(stream)
    assert recorder.calls == len(stream)
    assert recorder.overlaps == []
    assert set(recorder.handled) == set(expected)
    for order_id, message_ids in expected.items():
        assert recorder.handled[order_id] == message_ids, order_id
    assert await dead_letters(broker.connection_string) == []


async def test_slow_handlers_overlap_across_orders(
    broker: Any, stream: list[Outgoing]
) -> None:
    orders = sorted({message.session_id for message in stream})[:16]
    subset = [message for message in stream if message.session_id in orders][:48]
    await publish(broker.connection_string, subset)
    app = ConsumerApp(settings_for(broker.connection_string, max_concurrent_sessions=8))
    recorder = Recorder(delay_s=0.2)
    recorder.install(app)

    await consume(app, until_idle_s=0.5)

    serial_s = len(subset) * recorder.delay_s
    assert recorder.calls == len(subset)
    assert recorder.overlaps == []
    assert recorder.max_in_flight > 1
    # Generous bound: eight sessions at once should need about serial_s / 8.
    assert recorder.busy_s < serial_s / 2
    for order_id, message_ids in expected_order(subset).items():
        assert recorder.handled[order_id] == message_ids


async def test_prefetch_keeps_order(broker: Any, stream: list[Outgoing]) -> None:
    subset = stream[:400]
    await publish(broker.connection_string, subset)
    app = ConsumerApp(
        settings_for(
            broker.connection_string,
            prefetch_count=20,
            session_idle_timeout_s=0.05,
        )
    )
    recorder = Recorder()
    recorder.install(app)

    await consume(app)

    for order_id, message_ids in expected_order(subset).items():
        assert recorder.handled[order_id] == message_ids
