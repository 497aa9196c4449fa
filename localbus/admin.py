"""The broker's admin node, which injects faults for tests and the chaos harness.

A client reaches it like `$management`: a sender and a receiver link on
`$localbus-admin` in one session, a request with the application property
`operation` and a map body, and a reply with `statusCode` and `statusDescription`.
Links to the node are accepted only on connections that authenticated with SASL PLAIN
using the broker's shared access key name and key, from a loopback address. The SDK
authenticates with SASL ANONYMOUS and CBS tokens, so an SDK client never reaches it.

Operations:

- `cut-connections`, body `{entity}` (optional): reset every client connection at
  once, without AMQP close frames, or only the connections with a link on `entity`.
  The admin connection itself stays. Reply body `{connections: count}`.
- `expire-session-locks`, body `{entity, session-id}` (both optional): expire held
  session locks now, as if their lock duration had passed. Reply body
  `{sessions: [session ids]}`.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Protocol

from proton import Connection

from localbus.errors import ARGUMENT_ERROR, NOT_ALLOWED, UNAUTHORIZED, BrokerError
from localbus.management import ManagementReply, ManagementRequest
from localbus.protocol import ADMIN_ADDRESS
from localbus.sasl import SaslIdentity

CUT_CONNECTIONS = "cut-connections"
EXPIRE_SESSION_LOCKS = "expire-session-locks"


class BrokerControl(Protocol):
    """Broker operations that the admin node runs."""

    def cut_connections(
        self, entity: str | None, keep: Connection | None = None
    ) -> int: ...

    def expire_session_locks(
        self, entity: str | None, session_id: str | None
    ) -> list[str]: ...


def check_admin_access(connection: Connection) -> None:
    """Raise unauthorized-access unless `connection` may use the admin node."""
    identity: SaslIdentity | None = getattr(connection, "localbus_identity", None)
    if identity is None or not identity.key_verified:
        raise BrokerError(
            UNAUTHORIZED,
            f"{ADMIN_ADDRESS} needs a connection authenticated with SASL PLAIN, "
            "the shared access key name as user name and the key as password",
        )
    peer = getattr(connection, "localbus_peer", None)
    if not peer or not _is_loopback(str(peer[0])):
        raise BrokerError(
            UNAUTHORIZED, f"{ADMIN_ADDRESS} accepts connections from loopback only"
        )


def handle_admin(
    control: BrokerControl, request: ManagementRequest, connection: Connection
) -> ManagementReply:
    """Run one admin operation and return its reply."""
    try:
        body = _run(control, request, connection)
    except BrokerError as error:
        return ManagementReply(
            request.message_id,
            error.status_code,
            error.description,
            error_condition=error.condition,
        )
    return ManagementReply(request.message_id, 200, "OK", body)


def _run(
    control: BrokerControl, request: ManagementRequest, connection: Connection
) -> dict[str, Any]:
    entity = _optional_text(request, "entity")
    if request.operation == CUT_CONNECTIONS:
        count = control.cut_connections(entity, keep=connection)
        return {"connections": count}
    if request.operation == EXPIRE_SESSION_LOCKS:
        session_id = _optional_text(request, "session-id")
        return {"sessions": control.expire_session_locks(entity, session_id)}
    raise BrokerError(
        NOT_ALLOWED,
        f"the operation {request.operation!r} is not supported by {ADMIN_ADDRESS}; "
        f"use {CUT_CONNECTIONS} or {EXPIRE_SESSION_LOCKS}",
    )


def _optional_text(request: ManagementRequest, name: str) -> str | None:
    value = request.argument(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BrokerError(ARGUMENT_ERROR, f"{name} must be a non-empty string")
    return value


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
