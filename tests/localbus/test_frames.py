"""Frames a client sends on a channel after ending its session there are dropped."""

from __future__ import annotations

import logging

import pytest
from azure.servicebus import ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient

from localbus.frames import BEGIN, END, StrayFrameFilter
from localbus.sasl import AMQP_HEADER
from localbus.testing import RunningBroker
from tests.localbus.conftest import QUEUE

ATTACH = 0x12
DETACH = 0x16
TRANSFER = 0x14
EMPTY_FRAME = b"\x00\x00\x00\x08\x02\x00\x00\x00"


def frame(channel: int, performative: int, payload: bytes = b"") -> bytes:
    """Encode an AMQP frame whose body is a performative with an empty list."""
    body = b"\x00\x53" + bytes([performative]) + b"\x45" + payload
    size = 8 + len(body)
    return size.to_bytes(4, "big") + bytes([2, 0]) + channel.to_bytes(2, "big") + body


def filtered(*chunks: bytes) -> bytes:
    frames = StrayFrameFilter()
    return b"".join(frames.feed(chunk) for chunk in chunks)


def test_filter_passes_ordinary_frames() -> None:
    stream = AMQP_HEADER + frame(0, BEGIN) + frame(0, ATTACH) + EMPTY_FRAME
    assert filtered(stream) == stream


def test_filter_drops_detach_after_end() -> None:
    before = AMQP_HEADER + frame(1, BEGIN) + frame(2, BEGIN) + frame(1, END)
    stray = frame(1, DETACH)
    after = frame(2, DETACH) + frame(0, 0x18)
    assert filtered(before + stray + after) == before + after


def test_filter_keeps_channel_after_new_begin() -> None:
    stream = AMQP_HEADER + frame(1, END) + frame(1, BEGIN) + frame(1, ATTACH)
    assert filtered(stream) == stream


def test_filter_keeps_empty_frames_on_ended_channel() -> None:
    stream = AMQP_HEADER + frame(1, END) + b"\x00\x00\x00\x08\x02\x00\x00\x01"
    assert filtered(stream) == stream


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 11])
def test_filter_handles_any_chunking(chunk_size: int) -> None:
    kept = AMQP_HEADER + frame(1, BEGIN) + frame(1, END)
    stray = frame(1, TRANSFER, b"x" * 40)
    tail = frame(2, BEGIN)
    stream = kept + stray + tail
    chunks = [
        stream[index : index + chunk_size]
        for index in range(0, len(stream), chunk_size)
    ]
    assert filtered(*chunks) == kept + tail


def test_filter_stops_at_invalid_header() -> None:
    garbage = AMQP_HEADER + b"\xff" * 64
    assert filtered(garbage) == garbage


def test_filter_counts_dropped_frames() -> None:
    frames = StrayFrameFilter()
    frames.feed(AMQP_HEADER + frame(1, END) + frame(1, DETACH) + frame(1, DETACH))
    assert frames.dropped_frames == 2


async def test_sdk_close_after_management_keeps_connection_clean(
    local_broker: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="localbus")
    async with ServiceBusClient.from_connection_string(
        local_broker.connection_string
    ) as client:
        async with client.get_queue_sender(QUEUE) as sender:
            await sender.send_messages(ServiceBusMessage("x", session_id="m1"))
        async with client.get_queue_receiver(
            QUEUE, session_id="m1", max_wait_time=1
        ) as receiver:
            (message,) = await receiver.receive_messages(max_wait_time=1)
            await receiver.session.renew_lock()
            await receiver.complete_message(message)
    messages = [record.getMessage() for record in caplog.records]
    assert not [text for text in messages if "no such channel" in text]
    assert not [text for text in messages if "connection_failed" in text]
