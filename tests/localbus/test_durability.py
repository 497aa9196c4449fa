"""`--data-dir` durability and the subprocess broker's restart."""

from __future__ import annotations

from pathlib import Path

from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSubQueue

from localbus.config import QueueConfig, QueueSettings
from localbus.testing import run_broker, run_broker_process
from tests.localbus.conftest import QUEUE


def test_restart_keeps_messages_and_session_state(tmp_path: Path) -> None:
    with run_broker(entities=[QUEUE], data_dir=tmp_path) as broker:
        with ServiceBusClient.from_connection_string(broker.connection_string) as sdk:
            with sdk.get_queue_sender(QUEUE) as sender:
                sender.send_messages(
                    [ServiceBusMessage(f"m{i}", session_id="s1") for i in range(3)]
                )
            with sdk.get_queue_receiver(QUEUE, session_id="s1", max_wait_time=1) as r:
                (first,) = r.receive_messages(max_wait_time=1)
                r.complete_message(first)
                (second,) = r.receive_messages(max_wait_time=1)
                r.defer_message(second)
                r.session.set_state(b"after-m0")
    with run_broker(entities=[], data_dir=tmp_path) as broker:
        assert QUEUE in broker.state.targets
        with ServiceBusClient.from_connection_string(broker.connection_string) as sdk:
            with sdk.get_queue_receiver(QUEUE, session_id="s1", max_wait_time=1) as r:
                assert r.session.get_state() == b"after-m0"
                remaining = r.receive_messages(max_message_count=5, max_wait_time=1)
                assert [str(m) for m in remaining] == ["m2"]
                assert remaining[0].sequence_number == 3
                (deferred,) = r.receive_deferred_messages([2])
                assert str(deferred) == "m1"


def test_killed_process_restarts_with_messages(tmp_path: Path) -> None:
    plain = QueueConfig("jobs", QueueSettings(requires_session=False))
    with run_broker_process(entities=[plain], data_dir=tmp_path) as broker:
        port = broker.port
        with ServiceBusClient.from_connection_string(broker.connection_string) as sdk:
            with sdk.get_queue_sender("jobs") as sender:
                sender.send_messages([ServiceBusMessage("a"), ServiceBusMessage("b")])
        broker.kill()
        broker.start()
        assert broker.port == port
        with ServiceBusClient.from_connection_string(broker.connection_string) as sdk:
            with sdk.get_queue_receiver("jobs", max_wait_time=1) as receiver:
                received = receiver.receive_messages(
                    max_message_count=5, max_wait_time=1
                )
                assert [str(m) for m in received] == ["a", "b"]
                for message in received:
                    receiver.complete_message(message)
            with sdk.get_queue_sender("jobs") as sender:
                sender.send_messages(ServiceBusMessage("c"))
            with sdk.get_queue_receiver("jobs", max_wait_time=1) as receiver:
                (later,) = receiver.receive_messages(max_wait_time=1)
                assert later.sequence_number > received[-1].sequence_number


def test_lost_lock_counts_after_kill(tmp_path: Path) -> None:
    with run_broker_process(
        entities=[QUEUE], data_dir=tmp_path, max_delivery_count=2
    ) as broker:
        with ServiceBusClient.from_connection_string(broker.connection_string) as sdk:
            with sdk.get_queue_sender(QUEUE) as sender:
                sender.send_messages(
                    [ServiceBusMessage(body, session_id="s1") for body in "ab"]
                )
            for expected_count in (0, 1):
                receiver = sdk.get_queue_receiver(
                    QUEUE, session_id="s1", max_wait_time=1
                )
                (locked,) = receiver.receive_messages(max_wait_time=1)
                assert (str(locked), locked.delivery_count) == ("a", expected_count)
                # The broker dies with the message locked.
                broker.kill()
                broker.start()
                receiver.close()
            with sdk.get_queue_receiver(QUEUE, session_id="s1", max_wait_time=1) as r:
                (next_message,) = r.receive_messages(max_wait_time=1)
                assert (str(next_message), next_message.delivery_count) == ("b", 0)
                r.complete_message(next_message)
            with sdk.get_queue_receiver(
                QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=1
            ) as dead_letters:
                (dead,) = dead_letters.receive_messages(max_wait_time=1)
                assert str(dead) == "a"
                assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
                assert dead.delivery_count == 2
                dead_letters.complete_message(dead)


def test_restart_counts_only_unsettled_locks(tmp_path: Path) -> None:
    with run_broker_process(entities=[QUEUE], data_dir=tmp_path) as broker:
        with ServiceBusClient.from_connection_string(broker.connection_string) as sdk:
            with sdk.get_queue_sender(QUEUE) as sender:
                sender.send_messages(
                    [ServiceBusMessage(body, session_id="s1") for body in "abc"]
                )
            with sdk.get_queue_receiver(QUEUE, session_id="s1", max_wait_time=1) as r:
                first, second = r.receive_messages(max_message_count=2, max_wait_time=1)
                r.complete_message(first)
                r.abandon_message(second)
                (again,) = r.receive_messages(max_wait_time=1)
                assert (str(again), again.delivery_count) == ("b", 1)
                r.complete_message(again)
            broker.kill()
            broker.start()
            with sdk.get_queue_receiver(QUEUE, session_id="s1", max_wait_time=1) as r:
                (last,) = r.receive_messages(max_wait_time=1)
                assert (str(last), last.delivery_count) == ("c", 0)
                r.complete_message(last)
