"""The broker's listening socket: SASL in Python first, then proton's engine.

proton's own acceptor binds a transport to each socket as soon as it is accepted. This
listener runs `SaslNegotiation` on the socket first, on a selectable of its own, and
binds a server transport after the sasl-outcome. Proton then starts at the client's
AMQP protocol header and never runs SASL itself. `BrokerIOHandler` replaces proton's
I/O handler so that the received bytes pass `StrayFrameFilter` on their way in.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

from proton import Connection, Event, Handler, Transport
from proton.handlers import IOHandler
from proton.reactor import Container

from localbus.frames import StrayFrameFilter
from localbus.protocol import Timer
from localbus.sasl import NegotiationState, SaslIdentity, SaslNegotiation

log = logging.getLogger("localbus")

# A client that has not finished SASL after this long is disconnected.
HANDSHAKE_TIMEOUT_S = 30.0
RECEIVE_BYTES = 4096
LISTEN_BACKLOG = 128


class BrokerIOHandler(IOHandler):
    """proton's socket I/O, with the stray frame filter on the receive side.

    Only selectables with a `localbus_frames` filter are read here; others, such as
    the event injector, keep proton's behaviour.
    """

    def on_selectable_readable(self, event: Event) -> None:
        selectable = event.selectable
        frames = selectable.__dict__.get("localbus_frames")
        transport = selectable._transport
        if frames is None or not transport:
            super().on_selectable_readable(event)
            return
        capacity = transport.capacity()
        if capacity > 0:
            try:
                data = selectable.recv(capacity)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as error:
                log.info("connection_receive_failed error=%s", error)
                transport.close_tail()
                data = None
            if data == b"":
                self.on_selectable_error(event)
            elif data:
                passed = frames.feed(data)
                if passed:
                    transport.push(passed)
        self.update(transport, selectable, selectable._reactor.now)

    def on_selectable_writable(self, event: Event) -> None:
        selectable = event.selectable
        transport = selectable._transport
        if "localbus_frames" not in selectable.__dict__ or not transport:
            super().on_selectable_writable(event)
            return
        pending = transport.pending()
        if pending > 0:
            try:
                transport.pop(selectable.send(transport.peek(pending)))
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as error:
                # Clients often reset the socket right after their close frame,
                # before the broker's close reaches them.
                log.info("connection_send_failed error=%s", error)
                transport.close_head()
        if transport.pending() != pending:
            self.update(transport, selectable, selectable._reactor.now)


def abort_connection(connection: Connection) -> bool:
    """Close a connection's socket at once, without AMQP close frames.

    The socket is reset (SO_LINGER 0), as a network failure or a crashed broker
    would leave it. Returns false when the connection has no socket any more.
    """
    transport = connection.transport
    selectable = getattr(transport, "_selectable", None) if transport else None
    if selectable is None or selectable.is_terminal:
        return False
    try:
        selectable._delegate.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
    except OSError:
        pass  # the socket is already broken; closing it is all that is left
    transport.close_head()
    transport.close_tail()
    selectable.terminate()
    selectable._transport = None
    transport._selectable = None
    selectable.update()
    return True


class Listener(Handler):
    """Accept connections, negotiate SASL, then hand each socket to proton.

    `configure` is called with each new server transport before it is bound, and
    the connection carries `localbus_identity` (a `SaslIdentity`) and
    `localbus_peer` (the client's address) from its first event on.
    """

    def __init__(
        self,
        container: Container,
        host: str,
        port: int,
        negotiation: Callable[[], SaslNegotiation],
        configure: Callable[[Transport], None],
    ) -> None:
        super().__init__()
        self._container = container
        self._negotiation = negotiation
        self._configure = configure
        self._handshakes: set[SaslHandshake] = set()
        listening = socket.socket()
        try:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, True)
            listening.bind((host, port))
            listening.listen(LISTEN_BACKLOG)
            listening.setblocking(False)
        except OSError:
            listening.close()
            raise
        self._selectable = container.selectable(handler=self, delegate=listening)
        self._selectable.reading = True
        self._selectable._transport = None
        container.update(self._selectable)

    @property
    def port(self) -> int:
        """The TCP port the listener is bound to."""
        return int(self._selectable.getsockname()[1])

    def close(self) -> None:
        """Stop listening and drop the connections that are still in SASL."""
        if not self._selectable.is_terminal:
            self._selectable.terminate()
            self._selectable.update()
        for handshake in list(self._handshakes):
            handshake.close()

    def on_selectable_readable(self, event: Event) -> None:
        try:
            client, peer = self._selectable.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            log.warning("connection_accept_failed error=%s", error)
            return
        client.setsockopt(socket.SOL_TCP, socket.TCP_NODELAY, True)
        client.setblocking(False)
        handshake = SaslHandshake(self, client, peer, self._negotiation())
        self._handshakes.add(handshake)

    def hand_over(self, handshake: SaslHandshake, identity: SaslIdentity) -> None:
        """Bind a proton server transport to the negotiated socket."""
        self._handshakes.discard(handshake)
        container = self._container
        connection = container.connection(container.handler)
        # proton's I/O handler connects a bound connection to its URL unless the
        # connection came from an acceptor.
        connection._acceptor = self
        connection.localbus_identity = identity
        connection.localbus_peer = handshake.peer
        transport = Transport(Transport.SERVER)
        self._configure(transport)
        transport.bind(connection)
        selectable = container.selectable(delegate=handshake.socket)
        selectable._transport = transport
        transport._selectable = selectable
        frames = StrayFrameFilter()
        selectable.localbus_frames = frames
        remainder = frames.feed(handshake.negotiation.remainder)
        if remainder:
            transport.push(remainder)
        IOHandler.update(transport, selectable, container.now)

    def forget(self, handshake: SaslHandshake) -> None:
        """Drop a handshake that failed or timed out."""
        self._handshakes.discard(handshake)


class SaslHandshake(Handler):
    """The SASL exchange on one accepted socket, before proton owns it."""

    def __init__(
        self,
        listener: Listener,
        client: socket.socket,
        peer: Any,
        negotiation: SaslNegotiation,
    ) -> None:
        super().__init__()
        self.listener = listener
        self.socket = client
        self.peer = peer
        self.negotiation = negotiation
        self._output = b""
        self._finished = False
        container = listener._container
        self._selectable = container.selectable(handler=self, delegate=client)
        self._selectable.reading = True
        self._selectable._transport = None
        container.update(self._selectable)
        self._timer = container.schedule(HANDSHAKE_TIMEOUT_S, Timer(self._expire))

    def on_selectable_readable(self, event: Event) -> None:
        try:
            data = self.socket.recv(RECEIVE_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            log.info("sasl_failed peer=%s error=%s", self.peer, error)
            self.close()
            return
        if not data:
            self.close()
            return
        self._output += self.negotiation.feed(data)
        self._flush()

    def on_selectable_writable(self, event: Event) -> None:
        self._flush()

    def _flush(self) -> None:
        if self._output:
            try:
                sent = self.socket.send(self._output)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as error:
                log.info("sasl_failed peer=%s error=%s", self.peer, error)
                self.close()
                return
            self._output = self._output[sent:]
        self._selectable.writing = bool(self._output)
        self._selectable.update()
        if self._output:
            return
        state = self.negotiation.state
        if state is NegotiationState.FAILED:
            log.info(
                "sasl_rejected peer=%s reason=%s", self.peer, self.negotiation.failure
            )
            self.close()
        elif state is NegotiationState.DONE:
            identity = self.negotiation.identity
            assert identity is not None
            log.debug(
                "sasl_completed peer=%s mechanism=%s user=%s",
                self.peer,
                identity.mechanism,
                identity.username,
            )
            self._release()
            self.listener.hand_over(self, identity)

    def _expire(self) -> None:
        if not self._finished:
            log.info(
                "sasl_timed_out peer=%s after_s=%s", self.peer, HANDSHAKE_TIMEOUT_S
            )
            self.close()

    def _release(self) -> None:
        """Stop watching the socket without closing it, for the hand-over."""
        self._finished = True
        self._timer.cancel()
        self._selectable.release()
        self._selectable.terminate()
        self._selectable.update()

    def close(self) -> None:
        """Close the socket and forget the handshake."""
        self._finished = True
        self._timer.cancel()
        if not self._selectable.is_terminal:
            self._selectable.terminate()
            self._selectable.update()
        self.socket.close()
        self.listener.forget(self)
