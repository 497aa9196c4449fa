"""A scan of incoming AMQP frames that drops frames sent on an ended session's channel.

azure-servicebus 7.15 (pyamqp) may send the detach of its `$management` link after the
end of that link's session. AMQP 1.0 (part 2.7.8) allows no frame on a channel after
its end, and proton closes the connection with the error "no such channel", so the
SDK's clean close ends in an error on both sides. The broker drops such frames instead.

The scan reads only frame headers and the first bytes of each body, and passes the
received bytes on without copying them unless it drops or holds back a frame.
"""

from __future__ import annotations

import logging

log = logging.getLogger("localbus")

PROTOCOL_HEADER_BYTES = 8
FRAME_HEADER_BYTES = 8
AMQP_FRAME_TYPE = 0
# A performative is a described list whose descriptor is a small ulong:
# constructor 0x00, type code 0x53, then the descriptor code.
SMALL_ULONG_DESCRIPTOR = b"\x00\x53"
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
        position = min(self._header_left, len(data))
        self._header_left -= position
        while position < len(data):
            if self._frame_left == 0 and not self._start_frame(data, position):
                break
            take = min(self._frame_left, len(data) - position)
            if self._dropping:
                passed.append(data[keep_from:position])
                keep_from = position + take
            position += take
            self._frame_left -= take
        end = position
        if end < len(data) and not self._stopped:
            self._partial_header = data[end:]
        elif self._stopped:
            end = len(data)
        if keep_from == 0 and end == len(data):
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
        size = int.from_bytes(data[position : position + 4], "big")
        body_offset = data[position + 4] * 4
        if body_offset != FRAME_HEADER_BYTES or size < body_offset:
            # Not a frame any AMQP client sends. Proton reads the bytes unchanged
            # and closes the connection with a framing error.
            self._stopped = True
            return False
        performative = None
        if size > body_offset:
            if available < body_offset + DESCRIPTOR_BYTES:
                return False
            descriptor_at = position + body_offset
            descriptor = data[descriptor_at : descriptor_at + DESCRIPTOR_BYTES]
            if descriptor[:2] == SMALL_ULONG_DESCRIPTOR:
                performative = descriptor[2]
        frame_type = data[position + 5]
        channel = int.from_bytes(data[position + 6 : position + 8], "big")
        self._frame_left = size
        self._dropping = self._is_stray(frame_type, channel, performative)
        return True

    def _is_stray(
        self, frame_type: int, channel: int, performative: int | None
    ) -> bool:
        if frame_type != AMQP_FRAME_TYPE or performative is None:
            return False
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
