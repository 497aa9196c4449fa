"""Settings: YAML per env, environment overrides, messages without secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.config import ENV_PREFIX, Settings, load_settings, local_connection_string
from consumer.errors import ConfigurationError


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture
def config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(f"{ENV_PREFIX}CONFIG_DIR", str(tmp_path))
    return tmp_path


def test_dev_defaults_target_local_broker() -> None:
    settings = load_settings("dev")

    assert settings.entity_name == "orders.dev.events"
    assert settings.connection_string is not None
    assert "sb://127.0.0.1:5672" in settings.connection_string.get_secret_value()


def test_entity_follows_env(config_folder: Path) -> None:
    (config_folder / "sit.yaml").write_text("connection_string: Endpoint=sb://x;\n")

    assert load_settings("sit").entity_name == "orders.sit.events"


def test_env_variable_overrides_yaml(
    config_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (config_folder / "dev.yaml").write_text(
        "connection_string: Endpoint=sb://x;\nmax_concurrent_sessions: 4\n"
    )
    monkeypatch.setenv(f"{ENV_PREFIX}MAX_CONCURRENT_SESSIONS", "12")

    assert load_settings("dev").max_concurrent_sessions == 12


def test_keyword_overrides_env_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}MAX_CONCURRENT_SESSIONS", "12")

    assert load_settings("dev", max_concurrent_sessions=3).max_concurrent_sessions == 3


def test_env_variable_selects_yaml(
    config_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (config_folder / "prod.yaml").write_text(
        "connection_string: Endpoint=sb://x;\nprefetch_count: 7\n"
    )
    monkeypatch.setenv(f"{ENV_PREFIX}ENV", "prod")

    settings = Settings()

    assert settings.env == "prod"
    assert settings.prefetch_count == 7


def test_unknown_yaml_key_names_the_key(config_folder: Path) -> None:
    (config_folder / "dev.yaml").write_text("max_sessions: 3\n")

    with pytest.raises(ConfigurationError, match="max_sessions"):
        load_settings("dev")


def test_invalid_value_names_field_and_variable(config_folder: Path) -> None:
    (config_folder / "dev.yaml").write_text(
        "connection_string: Endpoint=sb://x;\nmax_concurrent_sessions: 0\n"
    )

    with pytest.raises(ConfigurationError) as raised:
        load_settings("dev")

    assert "max_concurrent_sessions" in str(raised.value)
    assert f"{ENV_PREFIX}MAX_CONCURRENT_SESSIONS" in str(raised.value)


def test_missing_broker_explains_both_options(config_folder: Path) -> None:
    with pytest.raises(ConfigurationError) as raised:
        load_settings("prod")

    assert "CONNECTION_STRING" in str(raised.value)
    assert "FULLY_QUALIFIED_NAMESPACE" in str(raised.value)


def test_retry_budget_longer_than_renewal_rejected() -> None:
    with pytest.raises(ConfigurationError, match="max_lock_renewal_s"):
        load_settings(
            "dev", retry_attempts=5, handler_timeout_s=100, max_lock_renewal_s=60
        )


def test_secret_absent_from_errors_and_description() -> None:
    secret = "c2VjcmV0LWtleS1mb3ItdGVzdHM="
    connection = f"Endpoint=sb://h;SharedAccessKeyName=k;SharedAccessKey={secret}"

    settings = load_settings("dev", connection_string=connection)
    with pytest.raises(ConfigurationError) as raised:
        load_settings("dev", connection_string=connection, prefetch_count=-1)

    assert secret not in repr(settings)
    assert secret not in str(settings.describe())
    assert secret not in str(raised.value)


def test_local_connection_string_uses_emulator_mode() -> None:
    value = local_connection_string("127.0.0.1", 5999)

    assert value.startswith("Endpoint=sb://127.0.0.1:5999;")
    assert value.endswith("UseDevelopmentEmulator=true")


def test_invalid_yaml_reports_path(config_folder: Path) -> None:
    (config_folder / "dev.yaml").write_text("max_concurrent_sessions: [1,\n")

    with pytest.raises(ConfigurationError, match="dev.yaml"):
        load_settings("dev")
