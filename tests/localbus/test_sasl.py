"""SASL ANONYMOUS and PLAIN, offered by the broker's own SASL layer."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus._pyamqp import SendClient
from azure.servicebus._pyamqp.authentication import SASLPlainAuth
from azure.servicebus._pyamqp.message import Message as PyamqpMessage
from azure.servicebus._pyamqp.message import Properties
from proton import ConnectionException, Described, Message, symbol, ulong
from proton.utils import BlockingConnection

from consumer.config import LOCAL_BROKER_KEY, LOCAL_BROKER_KEY_NAME
from localbus.auth import SharedAccessKey
from localbus.codec import encode_value
from localbus.sasl import (
    AMQP_HEADER,
    SASL_HEADER,
    NegotiationState,
    SaslCode,
    SaslNegotiation,
)
from localbus.testing import RunningBroker, run_broker
from tests.localbus.conftest import QUEUE

KEY = SharedAccessKey(LOCAL_BROKER_KEY_NAME, LOCAL_BROKER_KEY)
WRONG_PASSWORD = "not-the-key-5f0c"


def sasl_init(mechanism: str, response: bytes | None) -> bytes:
    """Encode a sasl-init frame the way a client sends it."""
    body = encode_value(Described(ulong(0x41), [symbol(mechanism), response]))
    size = 8 + len(body)
    return size.to_bytes(4, "big") + bytes([2, 1, 0, 0]) + body


def plain(user: str, password: str) -> bytes:
    return b"\0" + user.encode() + b"\0" + password.encode()


def outcome_code(output: bytes) -> int:
    """Return the code of the sasl-outcome frame at the end of `output`."""
    return output[-1]


def negotiate(data: bytes, require_auth: bool = False) -> tuple[SaslNegotiation, bytes]:
    negotiation = SaslNegotiation(KEY, require_auth)
    return negotiation, negotiation.feed(data)


def test_negotiation_offers_anonymous_and_plain() -> None:
    negotiation, output = negotiate(SASL_HEADER)
    assert output.startswith(SASL_HEADER)
    assert b"ANONYMOUS" in output
    assert b"PLAIN" in output
    assert negotiation.state is NegotiationState.INIT


def test_negotiation_accepts_anonymous_with_auth() -> None:
    negotiation, output = negotiate(
        SASL_HEADER + sasl_init("ANONYMOUS", None), require_auth=True
    )
    assert negotiation.state is NegotiationState.DONE
    assert outcome_code(output) == SaslCode.OK
    assert negotiation.identity is not None
    assert negotiation.identity.mechanism == "ANONYMOUS"
    assert not negotiation.identity.key_verified


def test_negotiation_verifies_plain_key() -> None:
    response = plain(KEY.name, KEY.key)
    negotiation, output = negotiate(SASL_HEADER + sasl_init("PLAIN", response))
    assert outcome_code(output) == SaslCode.OK
    assert negotiation.identity is not None
    assert negotiation.identity.username == KEY.name
    assert negotiation.identity.key_verified


@pytest.mark.parametrize(
    ("user", "password"),
    [(LOCAL_BROKER_KEY_NAME, WRONG_PASSWORD), ("someone", LOCAL_BROKER_KEY)],
)
def test_negotiation_rejects_wrong_plain_with_auth(user: str, password: str) -> None:
    data = SASL_HEADER + sasl_init("PLAIN", plain(user, password))
    negotiation, output = negotiate(data, require_auth=True)
    assert negotiation.state is NegotiationState.FAILED
    assert outcome_code(output) == SaslCode.AUTH
    assert password not in (negotiation.failure or "")


def test_negotiation_accepts_any_plain_without_auth() -> None:
    data = SASL_HEADER + sasl_init("PLAIN", plain("someone", WRONG_PASSWORD))
    negotiation, output = negotiate(data)
    assert negotiation.state is NegotiationState.DONE
    assert outcome_code(output) == SaslCode.OK
    assert negotiation.identity is not None
    assert not negotiation.identity.key_verified


@pytest.mark.parametrize(
    ("mechanism", "response"),
    [("EXTERNAL", None), ("PLAIN", b"no-separators"), ("PLAIN", None)],
)
def test_negotiation_rejects_bad_init(mechanism: str, response: bytes | None) -> None:
    data = SASL_HEADER + sasl_init(mechanism, response)
    negotiation, output = negotiate(data)
    assert negotiation.state is NegotiationState.FAILED
    assert outcome_code(output) == SaslCode.AUTH


def test_negotiation_keeps_bytes_after_outcome() -> None:
    after = AMQP_HEADER + b"\x00\x00\x00\x08\x02\x00\x00\x00"
    data = SASL_HEADER + sasl_init("ANONYMOUS", None) + after
    negotiation = SaslNegotiation(KEY, require_auth=False)
    for index in range(len(data)):
        negotiation.feed(data[index : index + 1])
    assert negotiation.state is NegotiationState.DONE
    assert negotiation.remainder == after


def test_negotiation_passes_plain_amqp_header() -> None:
    negotiation, output = negotiate(AMQP_HEADER + b"rest")
    assert output == b""
    assert negotiation.state is NegotiationState.DONE
    assert negotiation.remainder == AMQP_HEADER + b"rest"
    assert negotiation.identity is not None
    assert negotiation.identity.mechanism is None


def test_negotiation_answers_unknown_header() -> None:
    negotiation, output = negotiate(b"HTTP/1.1 GET /")
    assert output == SASL_HEADER
    assert negotiation.state is NegotiationState.FAILED


def test_negotiation_rejects_oversized_frame() -> None:
    frame_header = (1 << 20).to_bytes(4, "big") + bytes([2, 1, 0, 0])
    negotiation, output = negotiate(SASL_HEADER + frame_header)
    assert negotiation.state is NegotiationState.FAILED
    assert outcome_code(output) == SaslCode.SYS_PERM


@pytest.fixture
def auth_broker() -> Iterator[RunningBroker]:
    with run_broker(entities=[QUEUE], require_auth=True) as broker:
        yield broker


def plain_connection(broker: RunningBroker, password: str) -> BlockingConnection:
    """Connect a proton client with SASL PLAIN (no TLS, loopback only)."""
    return BlockingConnection(
        f"amqp://{broker.host}:{broker.port}",
        timeout=10,
        user=LOCAL_BROKER_KEY_NAME,
        password=password,
        allowed_mechs="PLAIN",
        allow_insecure_mechs=True,
    )


def stored_sessions(broker: RunningBroker) -> set[str]:
    return broker.call(lambda: set(broker.state.stores[QUEUE].sessions))


def test_plain_key_sends_without_token(auth_broker: RunningBroker) -> None:
    connection = plain_connection(auth_broker, LOCAL_BROKER_KEY)
    try:
        sender = connection.create_sender(QUEUE)
        sender.send(Message(body="hello", group_id="plain-ok"))
    finally:
        connection.close()
    assert "plain-ok" in stored_sessions(auth_broker)


def test_plain_wrong_password_fails_with_auth(auth_broker: RunningBroker) -> None:
    with pytest.raises(ConnectionException):
        plain_connection(auth_broker, WRONG_PASSWORD)


def test_plain_wrong_password_works_without_auth(
    local_broker: RunningBroker,
) -> None:
    connection = plain_connection(local_broker, WRONG_PASSWORD)
    try:
        sender = connection.create_sender(QUEUE)
        sender.send(Message(body="hello", group_id="plain-any"))
    finally:
        connection.close()
    assert "plain-any" in stored_sessions(local_broker)


def test_plain_never_logs_password(
    auth_broker: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="localbus")
    with pytest.raises(ConnectionException):
        plain_connection(auth_broker, WRONG_PASSWORD)
    connection = plain_connection(auth_broker, LOCAL_BROKER_KEY)
    connection.close()
    assert any("sasl_rejected" in record.getMessage() for record in caplog.records)
    for record in caplog.records:
        assert WRONG_PASSWORD not in record.getMessage()
        assert LOCAL_BROKER_KEY not in record.getMessage()


@pytest.mark.parametrize(("password", "sent"), [(LOCAL_BROKER_KEY, 1), ("wrong", 0)])
def test_sdk_pyamqp_plain_credential(
    auth_broker: RunningBroker, password: str, sent: int
) -> None:
    address = f"{auth_broker.host}:{auth_broker.port}"
    client = SendClient(
        address,
        f"amqp://{address}/{QUEUE}",
        auth=SASLPlainAuth(LOCAL_BROKER_KEY_NAME, password),
        use_tls=False,
        retry_total=0,
    )
    message = PyamqpMessage(data=[b"x"], properties=Properties(group_id="pyamqp"))
    try:
        if sent:
            client.send_message(message)
        else:
            with pytest.raises(ValueError, match="SASL negotiation failed"):
                client.send_message(message)
    finally:
        client.close()
    assert len(stored_sessions(auth_broker) & {"pyamqp"}) == sent


def test_sdk_anonymous_and_cbs_still_work(auth_broker: RunningBroker) -> None:
    with ServiceBusClient.from_connection_string(auth_broker.connection_string) as sdk:
        with sdk.get_queue_sender(QUEUE) as sender:
            sender.send_messages(ServiceBusMessage("cbs", session_id="cbs"))
        with sdk.get_queue_receiver(QUEUE, session_id="cbs", max_wait_time=1) as r:
            (received,) = r.receive_messages(max_wait_time=1)
            r.complete_message(received)
    assert str(received) == "cbs"
