"""Attaching the links that clients receive on, and feeding them messages.

`ReceiveLinks` is mixed into `BrokerHandler`. It turns a receive attach into a
receiver of the broker state, replies to it at once or when a session becomes
available, and sends messages while the link has credit.
"""

from __future__ import annotations

import itertools
import logging
import uuid

from proton import Connection, Endpoint, Link, Sender, symbol
from proton.reactor import Container

from localbus.codec import encode_delivery, tag_of
from localbus.errors import TIMEOUT, UNAUTHORIZED, BrokerError
from localbus.paths import entity_path
from localbus.protocol import Timer, condition_of, dotnet_ticks, read_filters
from localbus.state import BrokerState

log = logging.getLogger("localbus")

SESSION_FILTER = symbol("com.microsoft:session-filter")
LOCKED_UNTIL_UTC = symbol("com.microsoft:locked-until-utc")
ACCEPT_TIMEOUT = symbol("com.microsoft:timeout")
# azure-servicebus 7.15 itself waits 65 s for a next-available session when it
# sends no timeout, so the broker keeps such an accept pending as long.
DEFAULT_ACCEPT_TIMEOUT_S = 65.0


class ReceiveLinks:
    """Receive-link handling of the broker's proton handler."""

    state: BrokerState
    _require_auth: bool
    _container: Container | None
    _receive_links: dict[int, Sender]
    _receiver_ids: itertools.count[int]

    def _attach_receiver(self, link: Sender, path: str) -> None:
        filters = read_filters(link)
        has_filter = SESSION_FILTER in filters
        session_id = filters.get(SESSION_FILTER)
        receiver_id = next(self._receiver_ids)
        try:
            self._check_authorized(link, path)
            result = self.state.attach_receiver(
                receiver_id,
                path,
                session_id=None if session_id is None else str(session_id),
                session_filter=has_filter,
                receive_and_delete=link.remote_snd_settle_mode == Link.SND_SETTLED,
            )
        except BrokerError as error:
            self._reject_link(link, error)
            return
        link.localbus_receiver_id = receiver_id
        link.localbus_path = path
        link.localbus_session_filter = has_filter
        self._receive_links[receiver_id] = link
        link.connection.localbus_receivers.add(receiver_id)
        if result.waiting:
            self._wait_for_session(link, receiver_id)
            return
        self._complete_attach(link, result.session_id, result.locked_until_ms)

    def _wait_for_session(self, link: Sender, receiver_id: int) -> None:
        properties = link.remote_properties or {}
        timeout_ms = properties.get(ACCEPT_TIMEOUT)
        delay_s = timeout_ms / 1000 if timeout_ms else DEFAULT_ACCEPT_TIMEOUT_S

        def expire() -> None:
            link.localbus_accept_timer = None
            if not self.state.cancel_accept(receiver_id):
                return
            self._receive_links.pop(receiver_id, None)
            link.connection.localbus_receivers.discard(receiver_id)
            link.localbus_receiver_id = None
            # The SDK's attach callback reads the granted session from the session
            # filter and link properties whenever the reply's source address is the
            # entity's, and logs a warning when they are missing. A timed-out accept
            # grants nothing, so its reply names no source address: the SDK skips
            # the callback, and the detach that follows raises OperationTimeoutError.
            link.source.address = ""
            self._reject_link(
                link,
                BrokerError(
                    TIMEOUT,
                    f"no session of {entity_path(link.remote_source.address)} became "
                    f"available within {delay_s:.1f}s",
                ),
            )

        assert self._container is not None
        link.localbus_accept_timer = self._container.schedule(delay_s, Timer(expire))

    def _complete_attach(
        self, link: Sender, session_id: str | None, locked_until_ms: int | None
    ) -> None:
        if getattr(link, "localbus_session_filter", False):
            link.source.filter.put_map()
            link.source.filter.enter()
            link.source.filter.put_symbol(SESSION_FILTER)
            link.source.filter.put_string(session_id or "")
            link.source.filter.exit()
        if locked_until_ms is not None:
            link.properties = {LOCKED_UNTIL_UTC: dotnet_ticks(locked_until_ms)}
        link.open()
        receiver_id = link.localbus_receiver_id
        if receiver_id is not None:
            self._pump(link, receiver_id)

    def _reject_link(self, link: Link, error: BrokerError) -> None:
        # The SDK needs a reply attach before the detach that carries the error,
        # so open the link and close it at once.
        log.info(
            "link_rejected condition=%s description=%s",
            error.condition,
            error.description,
        )
        if link.state & Endpoint.LOCAL_UNINIT:
            link.open()
        link.condition = condition_of(error)
        link.close()

    def _check_authorized(self, link: Link, path: str) -> None:
        if not self._require_auth:
            return
        audiences: set[str] = link.connection.localbus_audiences
        entity = path.split("/", 1)[0].lower()
        if "" in audiences or entity in audiences:
            return
        raise BrokerError(
            UNAUTHORIZED,
            f"no valid token was put for {path!r}; put a token signed with the "
            "broker's shared access key on $cbs first",
        )

    def _requesting_receivers(
        self, connection: Connection, link_name: str | None
    ) -> frozenset[int]:
        """Return the ids of the receivers a `$management` request acts for.

        A request that names a receive link in `associated-link-name` acts for that
        link of its own connection only.
        """
        receiver_ids: set[int] = connection.localbus_receivers
        if link_name is None:
            # NOTE: a request that names no link acts for every receiver of its
            # connection. azure-servicebus 7.15 names the link on every request of a
            # receiver, so this covers only other clients.
            return frozenset(receiver_ids)
        return frozenset(
            receiver_id
            for receiver_id in receiver_ids
            if (link := self._receive_links.get(receiver_id)) is not None
            and link.name == link_name
        )

    def _pump(self, link: Sender, receiver_id: int) -> None:
        while link.credit > 0 and link.state & Endpoint.LOCAL_ACTIVE:
            record = self.state.receive(receiver_id)
            if record is None:
                break
            token = record.lock_token or uuid.uuid4()
            delivery = link.delivery(tag_of(token))
            link.send(encode_delivery(record))
            link.advance()
            if record.lock_token is None:
                delivery.settle()
            else:
                delivery.localbus_token = record.lock_token
        if link.drain_mode and link.credit > 0:
            link.drained()
