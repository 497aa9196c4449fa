"""A scan of incoming AMQP frames that drops frames sent on an ended session's channel.

azure-servicebus 7.15 (pyamqp) may send the detach of its `$management` link after the
end of that link's session. AMQP 1.0 allows no frame on a channel between the end of a
session and the next begin, and proton closes the connection with the error "no such
channel", so the SDK's clean close ends in an error on both sides. The broker drops
such frames instead.

The scan reads only frame headers and the first bytes of each body, and passes the
received bytes on without copying them unless it drops or holds back a frame.
"""

from __future__ import annotations

import logging
import struct

log = logging.getLogger("localbus")

PROTOCOL_HEADER_BYTES = 8
# size (4 bytes), data offset in 4-byte words, frame type, channel (2 bytes)
FRAME_HEADER = struct.Struct(">IBBH")
FRAME_HEADER_BYTES = FRAME_HEADER.size
DATA_OFFSET = 2
AMQP_FRAME_TYPE = 0
# A performative is a described list whose descriptor is a small ulong:
# constructor 0x00, type code 0x53, then the descriptor code.
SMALL_ULONG = 0x53
DESCRIPTOR_BYTES = 3
BEGIN = 0x11
END = 0x17


class StrayFrameFilter:
    """Stateful scan of one connection's incoming bytes, after the SASL layer.

    The stream starts with the 8-byte AMQP protocol header. Frames on a channel whose
    session the client ended are dropped until the client begins a new session on
    that channel. An invalid frame header, or one with an extended header, stops the
    scan, and from then on the bytes go to proton unchanged.
    """

    def __init__(self) -> None:
        self._header_left = PROTOCOL_HEADER_BYTES
        self._partial_header = b""
        self._frame_left = 0
        self._dropping = False
        self._ended: set[int] = set()
        self._stopped = False
        self.dropped_frames = 0

    def feed(self, data: bytes) -> bytes:
        """Return the part of `data` that proton may read, which can be empty."""
        if self._stopped:
            return data
        if self._partial_header:
            data = self._partial_header + data
            self._partial_header = b""
        passed: list[bytes] = []
        keep_from = 0
        length = len(data)
        position = min(self._header_left, length)
        self._header_left -= position
        while position < length:
            if self._frame_left == 0 and not self._start_frame(data, position):
                break
            take = min(self._frame_left, length - position)
            if self._dropping:
                passed.append(data[keep_from:position])
                keep_from = position + take
            position += take
            self._frame_left -= take
        end = position
        if end < length and not self._stopped:
            self._partial_header = data[end:]
        elif self._stopped:
            end = length
        if keep_from == 0 and end == length:
            return data
        passed.append(data[keep_from:end])
        return b"".join(passed)

    def _start_frame(self, data: bytes, position: int) -> bool:
        """Read the frame that starts at `position`; false when its header is cut off.

        Sets `_frame_left` to the frame size and `_dropping` to whether it is dropped.
        """
        available = len(data) - position
        if available < FRAME_HEADER_BYTES:
            return False
        size, data_offset, frame_type, channel = FRAME_HEADER.unpack_from(
            data, position
        )
        if data_offset != DATA_OFFSET or size < FRAME_HEADER_BYTES:
            # Not a frame any AMQP client sends. Proton reads the bytes unchanged
            # and closes the connection with a framing error.
            self._stopped = True
            return False
        has_body = size > FRAME_HEADER_BYTES and frame_type == AMQP_FRAME_TYPE
        if has_body and available < FRAME_HEADER_BYTES + DESCRIPTOR_BYTES:
            return False
        self._frame_left = size
        self._dropping = False
        if not has_body:
            return True
        descriptor_at = position + FRAME_HEADER_BYTES
        if data[descriptor_at] != 0 or data[descriptor_at + 1] != SMALL_ULONG:
            return True
        performative = data[descriptor_at + 2]
        # Only an end, or any frame while some channel is ended, needs a look.
        if performative == END or self._ended:
            self._dropping = self._is_stray(channel, performative)
        return True

    def _is_stray(self, channel: int, performative: int) -> bool:
        if performative == BEGIN:
            self._ended.discard(channel)
            return False
        if channel in self._ended:
            self.dropped_frames += 1
            log.debug(
                "stray_frame_dropped channel=%s performative=0x%02x",
                channel,
                performative,
            )
            return True
        if performative == END:
            self._ended.add(channel)
        return False
