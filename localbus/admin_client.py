"""A blocking client of the broker's admin node, on python-qpid-proton.

It authenticates with SASL PLAIN using the shared access key name and key, which the
admin node requires, and runs one request at a time. `localbus.testing` and the chaos
harness use it to inject faults into a broker that runs in another process.
"""

from __future__ import annotations

import uuid
from types import TracebackType
from typing import Any

from proton import Message
from proton.utils import BlockingConnection

from localbus.admin import ADMIN_ADDRESS, CUT_CONNECTIONS, EXPIRE_SESSION_LOCKS
from localbus.auth import SharedAccessKey

DEFAULT_TIMEOUT_S = 10.0


class AdminError(RuntimeError):
    """The admin node rejected a request or did not respond to it."""


class AdminClient:
    """One connection to the admin node of the broker at `host:port`."""

    def __init__(
        self,
        host: str,
        port: int,
        access_key: SharedAccessKey,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._timeout_s = timeout_s
        try:
            self._connection = BlockingConnection(
                f"amqp://{host}:{port}",
                timeout=timeout_s,
                user=access_key.name,
                password=access_key.key,
                allowed_mechs="PLAIN",
                # PLAIN sends the key in clear text, which is acceptable only
                # because the admin node accepts loopback connections alone.
                allow_insecure_mechs=True,
            )
        except Exception as error:  # proton raises ConnectionException and Timeout
            raise AdminError(
                f"cannot connect to the broker at {host}:{port}: {error}"
            ) from error
        try:
            self._sender = self._connection.create_sender(ADMIN_ADDRESS)
            self._receiver = self._connection.create_receiver(ADMIN_ADDRESS)
        except Exception as error:  # proton raises LinkDetached and timeouts
            self._connection.close()
            raise AdminError(f"cannot attach to {ADMIN_ADDRESS}: {error}") from error

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self._connection.close()

    def cut_connections(self, entity: str | None = None) -> int:
        """Reset the broker's client connections, or those with a link on `entity`.

        Returns how many connections were cut.
        """
        reply = self.request(CUT_CONNECTIONS, {"entity": entity})
        return int(reply["connections"])

    def expire_session_locks(
        self, entity: str | None = None, session_id: str | None = None
    ) -> list[str]:
        """Expire held session locks now; return the ids of the expired sessions."""
        reply = self.request(
            EXPIRE_SESSION_LOCKS, {"entity": entity, "session-id": session_id}
        )
        return [str(session_id) for session_id in reply["sessions"]]

    def request(self, operation: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return the reply body; raise `AdminError` on failure."""
        request_id = uuid.uuid4()
        body = {name: value for name, value in arguments.items() if value is not None}
        message = Message(
            id=request_id,
            reply_to=ADMIN_ADDRESS,
            properties={"operation": operation},
            body=body,
        )
        try:
            self._sender.send(message, timeout=self._timeout_s)
            reply = self._receiver.receive(timeout=self._timeout_s)
        except Exception as error:  # proton raises SendException and Timeout
            raise AdminError(f"{operation} failed: {error}") from error
        self._receiver.accept()
        properties = reply.properties or {}
        if reply.correlation_id != request_id:
            raise AdminError(
                f"{operation}: the reply's correlation id does not match the request"
            )
        if properties.get("statusCode") != 200:
            raise AdminError(
                f"{operation} failed with status {properties.get('statusCode')}: "
                f"{properties.get('statusDescription')}"
            )
        return dict(reply.body or {})
