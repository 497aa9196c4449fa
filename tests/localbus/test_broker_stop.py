"""Stopping the in-process broker releases its listening socket."""

from __future__ import annotations

import socket

import pytest

from localbus.testing import run_broker


def test_stopped_broker_refuses_connections() -> None:
    with run_broker(entities=["orders.stop.events"]) as broker:
        port = broker.port

    with socket.socket() as client:
        client.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.1", port))
