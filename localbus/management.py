"""Request/response operations on `$cbs` and `<entity>/$management`.

Requests carry the operation in the application property `operation` and the
arguments in an AMQP value map. Replies correlate by the request's message id and
report `statusCode`/`statusDescription` (`status-code`/`status-description` on
`$cbs`), with `errorCondition` when the operation failed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proton import UNDESCRIBED, Array, Data, Message, timestamp

from localbus.auth import SharedAccessKey, verify_sas_token
from localbus.codec import copy_binary, encode_delivery, read_incoming
from localbus.errors import ARGUMENT_ERROR, NOT_ALLOWED, UNAUTHORIZED, BrokerError
from localbus.messages import Delivery, MessageStatus
from localbus.paths import audience_path
from localbus.records import Outcome
from localbus.state import BrokerState

MANAGEMENT_SUFFIX = "/$management"
# Application property that names the link a request acts for. azure-servicebus
# 7.15 sends it with every request of a sender or receiver, naming that handler's link.
ASSOCIATED_LINK_NAME = "associated-link-name"
MAX_SESSION_STATE_BYTES = 256 * 1024
_OUTCOMES = {outcome.value: outcome for outcome in Outcome}


@dataclass(frozen=True)
class ManagementRequest:
    """A decoded request on a `$cbs` or `$management` link."""

    path: str
    operation: str
    message_id: Any
    properties: dict[str, Any]
    body: Any
    # Ids of the receivers the request comes from, set by the server from the
    # request's connection and `associated-link-name`. Operations on a session
    # succeed only when one of them holds it.
    requester: frozenset[int] = frozenset()

    @classmethod
    def decode(cls, payload: bytes, link_path: str) -> ManagementRequest:
        """Decode a request message received on the link at `link_path`."""
        message = Message()
        try:
            message.decode(payload)
        except Exception as error:  # proton raises several codec errors
            raise BrokerError(ARGUMENT_ERROR, "undecodable request message") from error
        properties = {
            str(key): value for key, value in (message.properties or {}).items()
        }
        path = link_path
        if path.lower().endswith(MANAGEMENT_SUFFIX):
            path = path[: -len(MANAGEMENT_SUFFIX)]
        return cls(
            path=path,
            operation=str(properties.get("operation", "")),
            message_id=message.id,
            properties=properties,
            body=copy_binary(message.body),
        )

    def argument(self, name: str, default: Any = None) -> Any:
        """Return one entry of the request's value map."""
        if not isinstance(self.body, dict):
            return default
        value = self.body.get(name, default)
        return list(value.elements) if isinstance(value, Array) else value

    @property
    def associated_link_name(self) -> str | None:
        """Return the name of the receive link the request acts for, if it names one."""
        value = self.properties.get(ASSOCIATED_LINK_NAME)
        return None if value is None else str(value)


@dataclass(frozen=True)
class ManagementReply:
    """The response to one request, ready to encode."""

    correlation_id: Any
    status_code: int
    description: str
    body: Any = None
    error_condition: str | None = None
    cbs: bool = False
    audience: str | None = None

    def encode(self) -> bytes:
        """Encode the reply as an AMQP message."""
        code_key, description_key = (
            ("status-code", "status-description")
            if self.cbs
            else ("statusCode", "statusDescription")
        )
        properties: dict[str, Any] = {
            code_key: self.status_code,
            description_key: self.description,
        }
        if self.error_condition is not None:
            properties["errorCondition"] = self.error_condition
        message = Message(
            correlation_id=self.correlation_id, properties=properties, body=self.body
        )
        return message.encode()


def handle_cbs(
    request: ManagementRequest, access_key: SharedAccessKey, require_auth: bool
) -> ManagementReply:
    """Reply to a CBS put-token request.

    With `require_auth` the token's SAS signature must verify against `access_key`.
    """
    if request.operation != "put-token":
        return ManagementReply(
            request.message_id,
            400,
            f"unsupported CBS operation {request.operation!r}",
            cbs=True,
        )
    audience = audience_path(str(request.properties.get("name", "")))
    if require_auth:
        try:
            signed = audience_path(
                verify_sas_token(str(request.body or ""), access_key)
            )
            # The token is signed for its resource (sr), and the name the client
            # puts it under must lie within it: the namespace covers every entity.
            if signed not in ("", audience):
                raise ValueError(
                    f"the token is signed for {signed!r}, not for {audience!r}"
                )
        except ValueError as error:
            return ManagementReply(
                request.message_id,
                401,
                f"put-token rejected: {error}",
                error_condition=UNAUTHORIZED,
                cbs=True,
            )
    return ManagementReply(
        request.message_id, 202, "Accepted", cbs=True, audience=audience
    )


def handle_management(
    state: BrokerState, request: ManagementRequest
) -> ManagementReply:
    """Run one `$management` operation against the broker state."""
    operation = request.operation.removeprefix("com.microsoft:")
    handler = _OPERATIONS.get(operation)
    try:
        if handler is None:
            raise BrokerError(
                NOT_ALLOWED, f"the operation {request.operation!r} is not supported"
            )
        status, body = handler(state, request)
    except BrokerError as error:
        return ManagementReply(
            request.message_id,
            error.status_code,
            error.description,
            error_condition=error.condition,
        )
    description = "OK" if status == 200 else "No Content"
    return ManagementReply(request.message_id, status, description, body)


Result = tuple[int, Any]


def _session_id(request: ManagementRequest) -> str | None:
    value = request.argument("session-id")
    return None if value in (None, "") else str(value)


def _required_session(request: ManagementRequest) -> str:
    session_id = _session_id(request)
    if session_id is None:
        raise BrokerError(ARGUMENT_ERROR, f"{request.operation} needs a session-id")
    return session_id


def _renew_session_lock(state: BrokerState, request: ManagementRequest) -> Result:
    until = state.renew_session_lock(
        request.path, _required_session(request), request.requester
    )
    return 200, {"expiration": timestamp(until)}


def _get_session_state(state: BrokerState, request: ManagementRequest) -> Result:
    _, session = state.held_session(
        request.path, _required_session(request), request.requester
    )
    return 200, {"session-state": session.state}


def _set_session_state(state: BrokerState, request: ManagementRequest) -> Result:
    value = request.argument("session-state")
    if value is not None:
        value = bytes(value)
        if len(value) > MAX_SESSION_STATE_BYTES:
            raise BrokerError(
                ARGUMENT_ERROR,
                f"session state of {len(value)} bytes exceeds the maximum of "
                f"{MAX_SESSION_STATE_BYTES} bytes",
            )
    state.set_session_state(
        request.path, _required_session(request), value, request.requester
    )
    return 200, {}


def _renew_lock(state: BrokerState, request: ManagementRequest) -> Result:
    tokens = [_uuid(token) for token in request.argument("lock-tokens", [])]
    expirations = [
        state.renew_message_lock(request.path, token, request.requester)
        for token in tokens
    ]
    array = Array(UNDESCRIBED, Data.TIMESTAMP, *[timestamp(e) for e in expirations])
    return 200, {"expirations": array}


def _update_disposition(state: BrokerState, request: ManagementRequest) -> Result:
    status = str(request.argument("disposition-status", ""))
    outcome = _OUTCOMES.get(status)
    if outcome is None:
        raise BrokerError(ARGUMENT_ERROR, f"unknown disposition-status {status!r}")
    reason = request.argument("deadletter-reason")
    description = request.argument("deadletter-description")
    for token in request.argument("lock-tokens", []):
        state.settle(
            request.path,
            _uuid(token),
            outcome,
            reason,
            description,
            request.requester,
        )
    return 200, {}


def _peek(state: BrokerState, request: ManagementRequest) -> Result:
    store = state.store_for(request.path)
    start = int(request.argument("from-sequence-number", 0) or 0)
    count = int(request.argument("message-count", 1) or 1)
    session_id = _session_id(request)
    peeked = []
    for message in store.ordered(start, session_id):
        if message.status is MessageStatus.SCHEDULED:
            continue
        delivery = Delivery.of(message)
        snapshot = Delivery(**{**delivery.__dict__, "lock_token": None})
        peeked.append({"message": encode_delivery(snapshot)})
        if len(peeked) >= count:
            break
    if not peeked:
        return 204, None
    return 200, {"messages": peeked}


def _receive_by_sequence_number(
    state: BrokerState, request: ManagementRequest
) -> Result:
    store = state.store_for(request.path)
    numbers = [int(number) for number in request.argument("sequence-numbers", [])]
    delete = int(request.argument("receiver-settle-mode", 1)) == 0
    session_id = _session_id(request)
    if store.requires_session:
        state.held_session(request.path, session_id or "", request.requester)
    received = []
    for number in numbers:
        message = store.messages.get(number)
        if message is None or message.status is not MessageStatus.DEFERRED:
            raise BrokerError(
                "com.microsoft:message-not-found",
                f"no deferred message with sequence number {number} in {store.name}",
            )
        if store.requires_session and message.session_id != session_id:
            raise BrokerError(
                "com.microsoft:message-not-found",
                f"deferred message {number} belongs to another session",
            )
        if delete:
            state.remove_message(store, message)
            received.append({"message": encode_delivery(Delivery.of(message))})
            continue
        state.lock_deferred(store, message, session_id)
        entry = {"message": encode_delivery(Delivery.of(message))}
        entry["lock-token"] = message.lock_token
        received.append(entry)
    return 200, {"messages": received}


def _schedule(state: BrokerState, request: ManagementRequest) -> Result:
    incoming = [
        read_incoming(bytes(item["message"]))
        for item in request.argument("messages", [])
    ]
    numbers = state.send(request.path, incoming)
    return 200, {"sequence-numbers": Array(UNDESCRIBED, Data.LONG, *numbers)}


def _cancel_scheduled(state: BrokerState, request: ManagementRequest) -> Result:
    numbers = [int(number) for number in request.argument("sequence-numbers", [])]
    state.cancel_scheduled(request.path, numbers)
    return 200, {}


def _get_message_sessions(state: BrokerState, request: ManagementRequest) -> Result:
    store = state.store_for(request.path)
    skip = int(request.argument("skip", 0) or 0)
    top = int(request.argument("top", 100) or 100)
    active = {message.session_id for message in store.messages.values()}
    with_state = {sid for sid, session in store.sessions.items() if session.state}
    names = sorted(name for name in active | with_state if name is not None)
    page = names[skip : skip + top]
    if not page:
        return 204, None
    return 200, {"skip": skip + len(page), "sessions-ids": page}


def _uuid(value: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return (
            uuid.UUID(bytes=bytes(value))
            if isinstance(value, bytes)
            else uuid.UUID(str(value))
        )
    except ValueError as error:
        raise BrokerError(ARGUMENT_ERROR, f"invalid lock token {value!r}") from error


_OPERATIONS: dict[str, Callable[[BrokerState, ManagementRequest], Result]] = {
    "renew-session-lock": _renew_session_lock,
    "get-session-state": _get_session_state,
    "set-session-state": _set_session_state,
    "renew-lock": _renew_lock,
    "update-disposition": _update_disposition,
    "peek-message": _peek,
    "receive-by-sequence-number": _receive_by_sequence_number,
    "schedule-message": _schedule,
    "cancel-scheduled-message": _cancel_scheduled,
    "get-message-sessions": _get_message_sessions,
}
