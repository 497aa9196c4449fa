"""The server side of the AMQP 1.0 SASL layer, run in Python before proton.

The python-qpid-proton wheel on PyPI has no Cyrus SASL, and its built-in SASL cannot
check PLAIN credentials as a server. `SaslNegotiation` therefore runs the exchange of
AMQP 1.0 part 5.3 itself: the client's SASL protocol header, the broker's header and
sasl-mechanisms frame, the client's sasl-init and the broker's sasl-outcome. The bytes
that follow, which start with the client's AMQP protocol header, are left for proton.

The class does no I/O: `feed()` takes received bytes and returns the bytes to send.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any

from proton import UNDESCRIBED, Array, Data, Described, symbol, ubyte, ulong

from localbus.auth import SharedAccessKey
from localbus.codec import copy_binary, encode_value

SASL_HEADER = b"AMQP\x03\x01\x00\x00"
AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
PROTOCOL_HEADER_BYTES = 8
FRAME_HEADER_BYTES = 8
SASL_FRAME_TYPE = 1
SASL_MECHANISMS = 0x40
SASL_INIT = 0x41
SASL_OUTCOME = 0x44
MECHANISMS = ("ANONYMOUS", "PLAIN")
# Clients send no more than a PLAIN response in a SASL frame, so a larger frame is
# taken for garbage.
MAX_SASL_FRAME_BYTES = 8192


class SaslCode(IntEnum):
    """Codes of the sasl-outcome frame (AMQP 1.0 part 5.3.3.6)."""

    OK = 0
    AUTH = 1
    SYS = 2
    SYS_PERM = 3
    SYS_TEMP = 4


class NegotiationState(Enum):
    """State of the SASL exchange."""

    HEADER = "header"
    INIT = "init"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class SaslIdentity:
    """The authentication of one connection.

    `mechanism` is None when the client skipped SASL and sent the AMQP header at
    once. `key_verified` is true when PLAIN credentials matched the broker's shared
    access key name and key.
    """

    mechanism: str | None
    username: str | None = None
    key_verified: bool = False


class SaslNegotiation:
    """The SASL exchange of one accepted connection, fed with the bytes received.

    PLAIN with the shared access key's name as the user name and the key as the
    password sets `identity.key_verified`. With `require_auth` other PLAIN
    credentials fail with the `auth` code. ANONYMOUS is always accepted, because the
    SDK authenticates each entity afterwards with a CBS token.
    """

    def __init__(self, access_key: SharedAccessKey, require_auth: bool) -> None:
        self._access_key = access_key
        self._require_auth = require_auth
        self._buffer = b""
        self.state = NegotiationState.HEADER
        self.identity: SaslIdentity | None = None
        self.failure: str | None = None
        self.remainder = b""

    def feed(self, data: bytes) -> bytes:
        """Consume received bytes and return the bytes to send back.

        After DONE, `remainder` contains the bytes received past the SASL layer, also
        those fed later. After FAILED, the caller sends the returned bytes and
        closes the socket.
        """
        if self.state is NegotiationState.DONE:
            self.remainder += data
            return b""
        if self.state is NegotiationState.FAILED:
            return b""
        self._buffer += data
        output = b""
        if self.state is NegotiationState.HEADER:
            output += self._read_header()
        if self.state is NegotiationState.INIT:
            output += self._read_init()
        return output

    def _read_header(self) -> bytes:
        if len(self._buffer) < PROTOCOL_HEADER_BYTES:
            return b""
        header = self._buffer[:PROTOCOL_HEADER_BYTES]
        if header == AMQP_HEADER:
            # The client skipped SASL, which counts as ANONYMOUS because CBS tokens
            # authorize each entity. Proton replies to the AMQP header itself.
            self.identity = SaslIdentity(mechanism=None)
            self.remainder = self._buffer
            self._buffer = b""
            self.state = NegotiationState.DONE
            return b""
        if header != SASL_HEADER:
            # AMQP 1.0 version negotiation: reply to an unsupported header with a
            # supported one, then close.
            self._fail(f"unsupported protocol header {header!r}")
            return SASL_HEADER
        self._buffer = self._buffer[PROTOCOL_HEADER_BYTES:]
        self.state = NegotiationState.INIT
        mechanisms = Array(UNDESCRIBED, Data.SYMBOL, *map(symbol, MECHANISMS))
        return SASL_HEADER + _sasl_frame(SASL_MECHANISMS, [mechanisms])

    def _read_init(self) -> bytes:
        try:
            body = self._take_frame()
            if body is None:
                return b""
            mechanism, response = _decode_init(body)
        except ValueError as error:
            self._fail(str(error))
            return _sasl_frame(SASL_OUTCOME, [ubyte(SaslCode.SYS_PERM)])
        code = self._authenticate(mechanism, response)
        if code is SaslCode.OK:
            self.remainder = self._buffer
            self._buffer = b""
            self.state = NegotiationState.DONE
        return _sasl_frame(SASL_OUTCOME, [ubyte(code)])

    def _take_frame(self) -> bytes | None:
        """Cut one complete SASL frame off the buffer and return its body."""
        if len(self._buffer) < FRAME_HEADER_BYTES:
            return None
        size = int.from_bytes(self._buffer[:4], "big")
        data_offset = self._buffer[4] * 4
        if self._buffer[5] != SASL_FRAME_TYPE:
            raise ValueError(f"expected a SASL frame, got frame type {self._buffer[5]}")
        if not FRAME_HEADER_BYTES <= data_offset <= size <= MAX_SASL_FRAME_BYTES:
            raise ValueError(f"invalid SASL frame of {size} bytes")
        if len(self._buffer) < size:
            return None
        body = self._buffer[data_offset:size]
        self._buffer = self._buffer[size:]
        return body

    def _authenticate(self, mechanism: str, response: bytes | None) -> SaslCode:
        if mechanism == "ANONYMOUS":
            self.identity = SaslIdentity(mechanism=mechanism)
            return SaslCode.OK
        if mechanism != "PLAIN":
            self._fail(f"unsupported mechanism {mechanism!r}")
            return SaslCode.AUTH
        credentials = _plain_credentials(response)
        if credentials is None:
            self._fail("malformed PLAIN initial response")
            return SaslCode.AUTH
        username, password = credentials
        verified = username == self._access_key.name and hmac.compare_digest(
            password.encode(), self._access_key.key.encode()
        )
        self.identity = SaslIdentity(mechanism, username, key_verified=verified)
        if self._require_auth and not verified:
            self._fail(f"PLAIN credentials of user {username!r} do not match the key")
            return SaslCode.AUTH
        return SaslCode.OK

    def _fail(self, reason: str) -> None:
        self.failure = reason
        self.state = NegotiationState.FAILED


def _sasl_frame(descriptor: int, fields: list[Any]) -> bytes:
    body = encode_value(Described(ulong(descriptor), fields))
    size = FRAME_HEADER_BYTES + len(body)
    # data offset 2 (in 4-byte words), frame type SASL, two ignored bytes
    return size.to_bytes(4, "big") + bytes([2, SASL_FRAME_TYPE, 0, 0]) + body


def _decode_init(body: bytes) -> tuple[str, bytes | None]:
    """Return the mechanism and initial response of a sasl-init frame body."""
    data = Data()
    try:
        data.decode(body)
    except Exception as error:  # proton raises DataException and others
        raise ValueError("undecodable SASL frame") from error
    data.rewind()
    data.next()
    value = copy_binary(data.get_object())
    if not isinstance(value, Described) or value.descriptor != SASL_INIT:
        raise ValueError("expected a sasl-init frame")
    fields = list(value.value or []) + [None, None]
    mechanism, response = fields[0], fields[1]
    if mechanism is None:
        raise ValueError("sasl-init names no mechanism")
    return str(mechanism), bytes(response) if response is not None else None


def _plain_credentials(response: bytes | None) -> tuple[str, str] | None:
    """Split a PLAIN response (RFC 4616: authzid NUL authcid NUL passwd)."""
    if response is None:
        return None
    parts = response.split(b"\0")
    if len(parts) != 3:
        return None
    try:
        return parts[1].decode("utf-8"), parts[2].decode("utf-8")
    except UnicodeDecodeError:
        return None
