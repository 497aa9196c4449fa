"""A minimal AMQP client on proton's engine, for tests that cut a connection short.

It drives a proton `Transport` by hand over a plain socket, so a test decides
exactly which bytes reach the broker before the socket closes.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable

from proton import Collector, Connection, Delivery, Link, Message, Transport, symbol


class RawClient:
    """One AMQP connection with one session, pumped explicitly."""

    def __init__(self, host: str, port: int) -> None:
        self.socket = socket.create_connection((host, port), timeout=5)
        self.transport = Transport()
        self.transport.sasl().allowed_mechs("ANONYMOUS")
        self.connection = Connection()
        self.collector = Collector()
        self.connection.collect(self.collector)
        self.transport.bind(self.connection)
        self.connection.open()
        self.session = self.connection.session()
        self.session.open()

    def pump_until(self, ready: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Exchange bytes with the broker until `ready()` holds."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout_s}s waiting for the broker"
                )
            self.flush()
            self.socket.settimeout(0.05)
            try:
                data = self.socket.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise ConnectionError("the broker closed the connection")
            self.transport.push(data)

    def flush(self, limit: int | None = None) -> int:
        """Write pending output; with `limit` write at most that many bytes."""
        pending = self.transport.pending()
        if pending <= 0:
            return 0
        size = pending if limit is None else min(limit, pending)
        chunk = self.transport.peek(size)
        self.socket.sendall(chunk)
        self.transport.pop(len(chunk))
        return len(chunk)

    def sender(self, address: str) -> Link:
        """Attach a sending link and wait for the broker's attach and credit."""
        link = self.session.sender(f"sender-{uuid.uuid4()}")
        link.target.address = address
        link.open()
        self.pump_until(lambda: link.credit > 0)
        return link

    def receiver(
        self, address: str, session_id: str | None, session_filter: bool = True
    ) -> Link:
        """Attach a peek-lock receiving link and give it credit.

        With `session_filter` the link requests the session `session_id`, or the
        next available one when it is None.
        """
        link = self.session.receiver(f"receiver-{uuid.uuid4()}")
        link.source.address = address
        link.rcv_settle_mode = Link.RCV_SECOND
        if not session_filter:
            link.open()
            link.flow(10)
            self.pump_until(lambda: bool(link.remote_source.address))
            return link
        link.source.filter.put_map()
        link.source.filter.enter()
        link.source.filter.put_symbol(symbol("com.microsoft:session-filter"))
        if session_id is None:
            link.source.filter.put_null()
        else:
            link.source.filter.put_string(session_id)
        link.source.filter.exit()
        link.open()
        link.flow(10)
        self.pump_until(lambda: bool(link.remote_source.address))
        return link

    def start_transfer(self, link: Link, message: Message) -> Delivery:
        """Queue a message on `link` without writing it to the socket yet."""
        delivery = link.delivery(uuid.uuid4().bytes)
        link.send(message.encode())
        link.advance()
        return delivery

    def close_abruptly(self) -> None:
        """Close the socket without any AMQP close frames."""
        self.socket.close()


def management_request(operation: str, body: dict[str, object]) -> Message:
    """Build a `$management` request message."""
    return Message(
        id=uuid.uuid4(),
        reply_to="$management",
        properties={"operation": f"com.microsoft:{operation}"},
        body=body,
    )
