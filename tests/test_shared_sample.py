"""The event models accept every event of a sample stream from another producer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from consumer.events import EVENT_TYPES, event_to_json, parse_event

REPOSITORY = Path(__file__).resolve().parents[1]
SAMPLE_FILE = REPOSITORY / ".." / "shared" / "data" / "order-events.jsonl"

pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.skipif(not SAMPLE_FILE.is_file(), reason=f"{SAMPLE_FILE} is absent"),
]


def test_sample_events_all_validate() -> None:
    counts: Counter[str] = Counter()

    with SAMPLE_FILE.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            event = parse_event(line.encode("utf-8"))
            counts[event.event_type] += 1
            assert json.loads(event_to_json(event)) == json.loads(line), number

    assert sum(counts.values()) == 4008
    assert set(counts) == set(EVENT_TYPES)
