"""The python-qpid-proton edge of the broker: connections, links and dispositions.

All protocol work happens on the proton container's thread. Each handler applies a
client request to `BrokerState` and then feeds the receivers named by the state's
events, so a waiting receiver or accept is woken by the arrival itself.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from proton import (
    Connection,
    Delivery,
    Disposition,
    Endpoint,
    Event,
    Handler,
    Link,
    Receiver,
    Sender,
    Transport,
)
from proton.reactor import Container

from localbus.admin import check_admin_access, handle_admin
from localbus.auth import SharedAccessKey
from localbus.codec import read_transfer
from localbus.errors import (
    SESSION_LOCK_LOST,
    BrokerError,
)
from localbus.listener import BrokerIOHandler, Listener, abort_connection
from localbus.management import ManagementRequest, handle_cbs, handle_management
from localbus.paths import entity_path
from localbus.protocol import (
    Timer,
    condition_of,
    guard_handlers,
    link_kind,
    outcome_of,
)
from localbus.receive_links import ReceiveLinks
from localbus.records import MessagesReady, SessionGranted, SessionLost
from localbus.sasl import SaslNegotiation
from localbus.state import BrokerState

log = logging.getLogger("localbus")

# Service Bus advertises an idle-time-out of 120 s in its open frame (seen in a Qpid
# JMS protocol trace against Service Bus). azure-servicebus 7.15 sends an empty frame
# once half of it passed without output, and its keep-alive thread checks that at
# least every 30 s, so a healthy idle SDK connection stays open.
DEFAULT_IDLE_TIMEOUT_S = 120.0
SEND_CREDIT = 200
# Application events injected from other threads by `localbus.testing`.
CALL_EVENT = "localbus_call"
STOP_EVENT = "localbus_stop"


@guard_handlers
class BrokerHandler(ReceiveLinks, Handler):
    """Proton handler that serves every connection of one broker."""

    def __init__(
        self,
        state: BrokerState,
        host: str,
        port: int,
        access_key: SharedAccessKey,
        require_auth: bool = False,
        on_listening: Callable[[int], None] | None = None,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    ) -> None:
        super().__init__()
        self.state = state
        self._host = host
        self._port = port
        self._access_key = access_key
        self._require_auth = require_auth
        self._on_listening = on_listening
        self._idle_timeout_s = idle_timeout_s
        self._container: Container | None = None
        self._connections: set[Connection] = set()
        self._receive_links: dict[int, Sender] = {}
        self._receiver_ids = itertools.count(1)
        self._timer: Any = None
        self._timer_at: float | None = None
        self.listener: Listener | None = None
        self.injector: Any = None
        self.listen_error: OSError | None = None

    # Container and connection life cycle ----------------------------------------

    def on_reactor_init(self, event: Event) -> None:
        self._container = event.container
        try:
            self.listener = Listener(
                event.container,
                self._host,
                self._port,
                lambda: SaslNegotiation(self._access_key, self._require_auth),
                self._configure_transport,
            )
        except OSError as error:
            log.error(
                "broker_listen_failed host=%s port=%s error=%s",
                self._host,
                self._port,
                error,
            )
            self.listen_error = error
            if self.injector is not None:
                self.injector.close()
            event.container.stop()
            return
        port = self.listener.port
        log.info("broker_listening host=%s port=%s", self._host, port)
        if self._on_listening is not None:
            self._on_listening(port)
        self._arm_timer()

    def on_localbus_call(self, event: Event) -> None:
        event.subject()
        self._after_change()

    def on_localbus_stop(self, event: Event) -> None:
        log.info("broker_stopping")
        if self._timer is not None:
            self._timer.cancel()
        if self.listener is not None:
            # Stopping the container leaves the listening socket open, so clients
            # would still connect to a broker that no longer responds.
            self.listener.close()
        if self.injector is not None:
            self.injector.close()
        assert self._container is not None
        self._container.stop()

    def _configure_transport(self, transport: Transport) -> None:
        # Proton closes a connection that sends nothing for this long and
        # advertises half of it as idle-time-out, so clients send empty frames.
        transport.idle_timeout = 2 * self._idle_timeout_s

    def on_connection_bound(self, event: Event) -> None:
        connection = event.connection
        connection.localbus_audiences = set()
        connection.localbus_receivers = set()
        identity = getattr(connection, "localbus_identity", None)
        if identity is not None and identity.key_verified:
            # PLAIN with the shared access key grants the whole namespace, as a
            # token for the namespace would.
            connection.localbus_audiences.add("")
        self._connections.add(connection)

    def on_connection_remote_open(self, event: Event) -> None:
        if event.connection.state & Endpoint.LOCAL_UNINIT:
            event.connection.open()

    def on_session_remote_open(self, event: Event) -> None:
        if event.session.state & Endpoint.LOCAL_UNINIT:
            event.session.open()

    def on_connection_remote_close(self, event: Event) -> None:
        self._release_connection(event.connection)
        event.connection.close()

    def on_session_remote_close(self, event: Event) -> None:
        link = event.session.connection.link_head(0)
        while link is not None:
            if link.session == event.session:
                self._forget_link(link)
            link = link.next(0)
        event.session.close()

    def on_transport_closed(self, event: Event) -> None:
        if event.connection is not None:
            self._connections.discard(event.connection)
            self._release_connection(event.connection)

    def on_transport_tail_closed(self, event: Event) -> None:
        connection = event.connection
        if connection is not None and connection.state & Endpoint.LOCAL_CLOSED:
            # Proton closes the output side itself once the close frame is out,
            # and a client that waits for that frame gets it.
            return
        # Proton stops reading after the peer's end of stream or an undecodable
        # frame, but it keeps the socket open until its output side closes too.
        event.transport.close_head()

    def on_transport_error(self, event: Event) -> None:
        if getattr(event.connection, "localbus_cut", False):
            return
        condition = event.transport.condition
        log.warning(
            "connection_failed error=%s", condition.description if condition else None
        )

    def _release_connection(self, connection: Any) -> None:
        receivers = getattr(connection, "localbus_receivers", set())
        for receiver_id in list(receivers):
            self._drop_receiver(receiver_id)
        receivers.clear()
        self._after_change()

    # Links ----------------------------------------------------------------------

    def on_link_remote_open(self, event: Event) -> None:
        link = event.link
        if not link.state & Endpoint.LOCAL_UNINIT:
            return
        if link.is_receiver:
            self._open_incoming_link(link)
        else:
            self._open_outgoing_link(link)
        self._after_change()

    def on_link_remote_close(self, event: Event) -> None:
        self._forget_link(event.link)
        if event.link.state & Endpoint.LOCAL_ACTIVE:
            event.link.close()
        self._after_change()

    def on_link_flow(self, event: Event) -> None:
        link = event.link
        receiver_id = getattr(link, "localbus_receiver_id", None)
        if link.is_sender and receiver_id is not None:
            self._pump(link, receiver_id)

    def _forget_link(self, link: Link) -> None:
        receiver_id = getattr(link, "localbus_receiver_id", None)
        if receiver_id is not None:
            self._drop_receiver(receiver_id)
            link.localbus_receiver_id = None

    def _drop_receiver(self, receiver_id: int) -> None:
        link = self._receive_links.pop(receiver_id, None)
        if link is None:
            return
        timer = getattr(link, "localbus_accept_timer", None)
        if timer is not None:
            timer.cancel()
        link.connection.localbus_receivers.discard(receiver_id)
        self.state.detach_receiver(receiver_id)

    def _open_incoming_link(self, link: Receiver) -> None:
        """Attach a link the client sends on: an entity, `$cbs` or `$management`."""
        path = entity_path(link.remote_target.address)
        link.target.address = link.remote_target.address
        link.source.address = link.remote_source.address
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        kind = link_kind(path)
        link.localbus_kind = kind
        link.localbus_path = path
        link.localbus_rejection = None
        try:
            if kind == "entity":
                target = self.state.target_for(path)
                self._check_authorized(link, path)
                link.max_message_size = target.max_message_size_bytes
            elif kind == "management":
                # The management node of an entity reads and changes its messages
                # and sessions, so it needs a token for that entity too.
                self._check_authorized(link, path)
            elif kind == "admin":
                check_admin_access(link.connection)
        except BrokerError as error:
            # The SDK sends its first message before it reads a detach that
            # follows the attach, and then reports an unknown error. Rejecting
            # that message with the error lets it raise the matching exception.
            link.localbus_rejection = error
        link.open()
        link.flow(SEND_CREDIT)

    def _open_outgoing_link(self, link: Sender) -> None:
        """Attach a link the client receives on: replies or an entity's messages."""
        path = entity_path(link.remote_source.address)
        link.source.address = link.remote_source.address
        link.target.address = link.remote_target.address
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        kind = link_kind(path)
        try:
            if kind == "admin":
                check_admin_access(link.connection)
            elif kind == "management":
                self._check_authorized(link, path)
        except BrokerError as error:
            self._reject_link(link, error)
            return
        if kind != "entity":
            link.session.localbus_replies = {
                **getattr(link.session, "localbus_replies", {}),
                path.lower(): link,
            }
            link.open()
            return
        self._attach_receiver(link, path)

    # Deliveries -----------------------------------------------------------------

    def on_delivery(self, event: Event) -> None:
        delivery = event.delivery
        link = event.link
        if link.is_receiver:
            self._on_transfer(link, delivery)
        elif delivery.updated:
            self._on_disposition(link, delivery)
        self._after_change()

    def _on_transfer(self, link: Receiver, delivery: Delivery) -> None:
        if delivery.partial:
            return
        payload = link.recv(delivery.pending) or b""
        link.advance()
        if delivery.aborted:
            delivery.settle()
            return
        if link.credit < SEND_CREDIT // 2:
            link.flow(SEND_CREDIT - link.credit)
        kind = getattr(link, "localbus_kind", "entity")
        rejection = getattr(link, "localbus_rejection", None)
        if rejection is not None:
            delivery.local.condition = condition_of(rejection)
            delivery.update(Disposition.REJECTED)
            delivery.settle()
            self._reject_link(link, rejection)
            return
        try:
            if kind == "entity":
                self._accept_messages(link, bytes(payload))
            else:
                self._answer_request(link, kind, bytes(payload))
        except BrokerError as error:
            delivery.local.condition = condition_of(error)
            delivery.update(Disposition.REJECTED)
            delivery.settle()
            return
        delivery.update(Disposition.ACCEPTED)
        delivery.settle()

    def _accept_messages(self, link: Receiver, payload: bytes) -> None:
        path = link.localbus_path
        limit = self.state.target_for(path).max_message_size_bytes
        self.state.send(path, read_transfer(payload, path, limit))

    def _answer_request(self, link: Receiver, kind: str, payload: bytes) -> None:
        request = ManagementRequest.decode(payload, link.localbus_path)
        if kind == "cbs":
            reply = handle_cbs(request, self._access_key, self._require_auth)
            if reply.audience is not None:
                link.connection.localbus_audiences.add(reply.audience)
        elif kind == "admin":
            reply = handle_admin(self, request, link.connection)
        else:
            requester = self._requesting_receivers(
                link.connection, request.associated_link_name
            )
            reply = handle_management(
                self.state, dataclasses.replace(request, requester=requester)
            )
        replies = getattr(link.session, "localbus_replies", {})
        reply_link = replies.get(link.localbus_path.lower())
        if reply_link is None or not reply_link.state & Endpoint.LOCAL_ACTIVE:
            log.warning(
                "reply_dropped path=%s reason=no reply link", link.localbus_path
            )
            return
        reply_link.delivery(uuid.uuid4().bytes)
        reply_link.send(reply.encode())
        reply_link.advance()
        if reply_link.snd_settle_mode == Link.SND_SETTLED:
            reply_link.current.settle() if reply_link.current else None

    def _on_disposition(self, link: Sender, delivery: Delivery) -> None:
        token = getattr(delivery, "localbus_token", None)
        if token is None:
            delivery.settle()
            return
        outcome, reason, description = outcome_of(delivery)
        delivery.localbus_token = None
        try:
            self.state.settle(link.localbus_path, token, outcome, reason, description)
        except BrokerError as error:
            log.info("settlement_rejected condition=%s", error.condition)
            delivery.local.condition = condition_of(error)
            delivery.update(Disposition.REJECTED)
            delivery.settle()
            return
        delivery.update(delivery.remote_state)
        delivery.settle()

    # Events and timers ------------------------------------------------------------

    def _after_change(self) -> None:
        for event in self.state.drain_events():
            link = self._receive_links.get(event.receiver_id)
            if link is None:
                log.debug("event_dropped reason=receive link gone event=%s", event)
                continue
            if isinstance(event, SessionGranted):
                timer = getattr(link, "localbus_accept_timer", None)
                if timer is not None:
                    timer.cancel()
                    link.localbus_accept_timer = None
                self._complete_attach(link, event.session_id, event.locked_until_ms)
            elif isinstance(event, SessionLost):
                self._receive_links.pop(event.receiver_id, None)
                link.connection.localbus_receivers.discard(event.receiver_id)
                link.localbus_receiver_id = None
                self.state.detach_receiver(event.receiver_id)
                self._reject_link(
                    link,
                    BrokerError(
                        SESSION_LOCK_LOST,
                        f"the lock on session {event.session_id!r} expired",
                    ),
                )
            elif (
                isinstance(event, MessagesReady) and link.state & Endpoint.LOCAL_ACTIVE
            ):
                self._pump(link, event.receiver_id)
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = self.state.next_deadline()
        if deadline is None or self._container is None:
            return
        if self._timer_at is not None and self._timer_at <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        delay = max(0.0, deadline - time.time()) + 0.001
        self._timer = self._container.schedule(delay, Timer(self._on_deadline))

    def _on_deadline(self) -> None:
        self._timer = None
        self._timer_at = None
        self.state.fire_deadlines()
        self._after_change()

    # Faults for the admin node ------------------------------------------------------

    def cut_connections(
        self, entity: str | None = None, keep: Connection | None = None
    ) -> int:
        """Reset client connections without AMQP close frames; return how many.

        With `entity`, only connections that have a link on that entity (its
        queue, subscriptions, dead-letter queue or `$management`) are cut.
        """
        cut = 0
        for connection in list(self._connections):
            if connection == keep:
                continue
            if entity is not None and not _has_link_on(connection, entity):
                continue
            connection.localbus_cut = True
            if abort_connection(connection):
                cut += 1
        log.info("connections_cut entity=%s count=%s", entity, cut)
        return cut

    def expire_session_locks(
        self, entity: str | None = None, session_id: str | None = None
    ) -> list[str]:
        """Expire held session locks now; return the ids of the expired sessions."""
        expired = self.state.expire_session_locks(entity, session_id)
        self._after_change()
        log.info("session_locks_expired entity=%s sessions=%s", entity, expired)
        return expired


def create_container(handler: BrokerHandler) -> Container:
    """Return a proton container that runs `handler` with the broker's socket I/O."""
    return Container(handler, global_handler=BrokerIOHandler())


def _has_link_on(connection: Connection, entity: str) -> bool:
    wanted = entity.strip("/").lower()
    link = connection.link_head(0)
    while link is not None:
        terminus = link.remote_target if link.is_receiver else link.remote_source
        if entity_path(terminus.address).split("/", 1)[0].lower() == wanted:
            return True
        link = link.next(0)
    return False
