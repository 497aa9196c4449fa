"""Emulator Config.json parsing, the command line and --require-auth."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus.exceptions import ServiceBusAuthenticationError

from localbus.auth import SharedAccessKey, verify_sas_token
from localbus.cli import main
from localbus.config import (
    BrokerConfigError,
    QueueConfig,
    TopicConfig,
    load_emulator_config,
    parse_duration_s,
)
from localbus.management import ManagementRequest, handle_cbs
from localbus.testing import run_broker, run_broker_process

EMULATOR_CONFIG = {
    "UserConfig": {
        "Namespaces": [
            {
                "Name": "sbemulatorns",
                "Queues": [
                    {
                        "Name": "orders.dev.events",
                        "Properties": {
                            "DeadLetteringOnMessageExpiration": False,
                            "DefaultMessageTimeToLive": "PT1H",
                            "DuplicateDetectionHistoryTimeWindow": "PT20S",
                            "ForwardDeadLetteredMessagesTo": "",
                            "ForwardTo": "",
                            "LockDuration": "PT1M",
                            "MaxDeliveryCount": 3,
                            "RequiresDuplicateDetection": True,
                            "RequiresSession": True,
                        },
                    }
                ],
                "Topics": [
                    {
                        "Name": "events",
                        "Properties": {"DefaultMessageTimeToLive": "PT1H"},
                        "Subscriptions": [
                            {
                                "Name": "created",
                                "Properties": {"LockDuration": "PT30S"},
                                "Rules": [
                                    {
                                        "Name": "only-created",
                                        "Properties": {
                                            "FilterType": "Correlation",
                                            "CorrelationFilter": {"Label": "CREATED"},
                                        },
                                    }
                                ],
                            }
                        ],
                    }
                ],
            }
        ],
        "Logging": {"Type": "File"},
    }
}


def write_config(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "Config.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def test_emulator_config_is_translated(tmp_path: Path) -> None:
    queue, topic = load_emulator_config(write_config(tmp_path, EMULATOR_CONFIG))
    assert isinstance(queue, QueueConfig)
    assert queue.settings.requires_session
    assert queue.settings.lock_duration_s == 60
    assert queue.settings.max_delivery_count == 3
    assert queue.settings.default_ttl_s == 3600
    assert queue.duplicate_detection
    assert queue.duplicate_window_s == 20
    assert isinstance(topic, TopicConfig)
    (subscription,) = topic.subscriptions
    assert subscription.settings.lock_duration_s == 30
    assert subscription.settings.default_ttl_s == 3600
    assert subscription.rules[0].subject == "CREATED"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            lambda q: q["Properties"].update(EnablePartitioning=True),
            "EnablePartitioning",
        ),
        (lambda q: q["Properties"].update(ForwardTo="elsewhere"), "ForwardTo"),
        (lambda q: q["Properties"].update(LockDuration="one minute"), "LockDuration"),
        (lambda q: q.update(Extra=1), "Extra"),
    ],
)
def test_unsupported_property_is_rejected(tmp_path: Path, change, named: str) -> None:  # type: ignore[no-untyped-def]
    document = json.loads(json.dumps(EMULATOR_CONFIG))
    change(document["UserConfig"]["Namespaces"][0]["Queues"][0])
    with pytest.raises(BrokerConfigError, match=named):
        load_emulator_config(write_config(tmp_path, document))


def test_sql_filter_is_rejected(tmp_path: Path) -> None:
    document = json.loads(json.dumps(EMULATOR_CONFIG))
    topic = document["UserConfig"]["Namespaces"][0]["Topics"][0]
    rule = topic["Subscriptions"][0]["Rules"][0]["Properties"]
    rule["FilterType"] = "Sql"
    with pytest.raises(BrokerConfigError, match="FilterType"):
        load_emulator_config(write_config(tmp_path, document))


def test_iso_durations() -> None:
    assert parse_duration_s("PT1M", "x") == 60
    assert parse_duration_s("P1DT2H", "x") == 93600
    assert parse_duration_s("PT0.5S", "x") == 0.5
    with pytest.raises(BrokerConfigError):
        parse_duration_s("P", "x")


def test_cli_names_bad_property(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = json.loads(json.dumps(EMULATOR_CONFIG))
    document["UserConfig"]["Namespaces"][0]["Queues"][0]["Properties"]["Bogus"] = 1
    status = main(["--config", str(write_config(tmp_path, document)), "--port", "0"])
    assert status == 2
    assert "Bogus" in capsys.readouterr().err


def test_cli_process_exits_cleanly() -> None:
    with run_broker_process(entities=["cli.events"]) as broker:
        assert broker.port > 0
        with ServiceBusClient.from_connection_string(broker.connection_string) as sdk:
            with sdk.get_queue_sender("cli.events") as sender:
                sender.send_messages(ServiceBusMessage("x", session_id="s"))
        broker.terminate()
        assert broker.exit_status == 0


def test_require_auth_rejects_wrong_key() -> None:
    with run_broker(require_auth=True) as broker:
        with ServiceBusClient.from_connection_string(broker.connection_string) as sdk:
            with sdk.get_queue_sender("orders.dev.events") as sender:
                sender.send_messages(ServiceBusMessage("ok", session_id="s"))
        wrong = broker.connection_string.replace("SAS_KEY_VALUE", "not-the-key")
        with ServiceBusClient.from_connection_string(wrong, retry_total=0) as sdk:
            with pytest.raises(ServiceBusAuthenticationError):
                with sdk.get_queue_sender("orders.dev.events") as sender:
                    sender.send_messages(ServiceBusMessage("no", session_id="s"))


def test_sas_token_checks() -> None:
    from azure.servicebus._pyamqp.utils import generate_sas_token

    key = SharedAccessKey("RootManageSharedAccessKey", "secret")
    token = generate_sas_token("sb://h/q", key.name, key.key, expiry=4_000_000_000)
    assert verify_sas_token(token, key, now_s=1) == "sb://h/q"
    with pytest.raises(ValueError, match="signature"):
        verify_sas_token(token, SharedAccessKey(key.name, "other"), now_s=1)
    with pytest.raises(ValueError, match="expired"):
        verify_sas_token(token, key, now_s=5_000_000_000)


def test_port_in_use_fails_fast(capsys: pytest.CaptureFixture[str]) -> None:
    with run_broker() as broker:
        status = main(["--port", str(broker.port)])
        assert status == 1
        assert "cannot listen" in capsys.readouterr().err
        with pytest.raises(RuntimeError, match="cannot listen"):
            with run_broker(port=broker.port):
                pass


def test_sas_token_needs_key_name() -> None:
    from azure.servicebus._pyamqp.utils import generate_sas_token

    key = SharedAccessKey("RootManageSharedAccessKey", "secret")
    token = generate_sas_token("sb://h/q", key.name, key.key, expiry=4_000_000_000)
    without_name = "&".join(
        part for part in token.split("&") if not part.startswith("skn=")
    )
    with pytest.raises(ValueError, match="skn"):
        verify_sas_token(without_name, key, now_s=1)


def _put_token(name: str, token: str) -> ManagementRequest:
    return ManagementRequest(
        path="$cbs",
        operation="put-token",
        message_id=1,
        properties={"name": name},
        body=token,
    )


def test_cbs_token_covers_only_its_resource() -> None:
    from azure.servicebus._pyamqp.utils import generate_sas_token

    key = SharedAccessKey("RootManageSharedAccessKey", "secret")
    expiry = int(time.time()) + 3600
    queue_a = generate_sas_token("sb://h/queue-a", key.name, key.key, expiry=expiry)
    namespace = generate_sas_token("sb://h/", key.name, key.key, expiry=expiry)

    own = handle_cbs(_put_token("sb://h/queue-a", queue_a), key, require_auth=True)
    assert own.status_code == 202
    assert own.audience == "queue-a"
    # A token signed for one queue, put under another queue's name.
    other = handle_cbs(_put_token("sb://h/queue-b", queue_a), key, require_auth=True)
    assert other.status_code == 401
    assert other.audience is None
    wide = handle_cbs(_put_token("sb://h/queue-b", namespace), key, require_auth=True)
    assert wide.status_code == 202
    assert wide.audience == "queue-b"
