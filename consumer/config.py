"""Settings from `config/<env>.yaml`, `ORDERS_CONSUMER_*` variables and code.

Precedence, highest first: keyword arguments to `Settings(...)`, environment variables
named `ORDERS_CONSUMER_<FIELD>`, the YAML file of the selected env, the field defaults.
The env itself comes from the `env` argument, else `ORDERS_CONSUMER_ENV`, else `dev`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from consumer.errors import ConfigurationError

Env = Literal["dev", "sit", "prod"]
ENV_PREFIX = "ORDERS_CONSUMER_"
# The well-known key of Microsoft's Service Bus emulator. It guards nothing: the local
# broker accepts any key unless it runs with --require-auth.
LOCAL_BROKER_KEY = "SAS_KEY_VALUE"
LOCAL_BROKER_KEY_NAME = "RootManageSharedAccessKey"


def local_connection_string(host: str = "127.0.0.1", port: int = 5672) -> str:
    """Return the connection string of a local broker listening on `host:port`."""
    return (
        f"Endpoint=sb://{host}:{port};SharedAccessKeyName={LOCAL_BROKER_KEY_NAME};"
        f"SharedAccessKey={LOCAL_BROKER_KEY};UseDevelopmentEmulator=true"
    )


def config_dir() -> Path:
    """Return the folder holding `<env>.yaml`.

    `ORDERS_CONSUMER_CONFIG_DIR` wins; otherwise `./config` when it exists, else the
    `config/` folder of the source tree this package was installed from.
    """
    explicit = os.environ.get(f"{ENV_PREFIX}CONFIG_DIR")
    if explicit:
        return Path(explicit)
    local = Path.cwd() / "config"
    if local.is_dir():
        return local
    return Path(__file__).resolve().parent.parent / "config"


class _YamlSource(PydanticBaseSettingsSource):
    """Read the fields of `config/<env>.yaml`; a missing file contributes nothing."""

    def __init__(self, settings_cls: type[BaseSettings], env: str) -> None:
        super().__init__(settings_cls)
        self._values = self._load(env)

    @staticmethod
    def _load(env: str) -> dict[str, Any]:
        path = config_dir() / f"{env}.yaml"
        if not path.is_file():
            return {}
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigurationError(f"invalid YAML in {path}: {error}") from error
        if not isinstance(data, dict):
            raise ConfigurationError(
                f"{path} must contain a mapping of setting names to values, "
                f"got {type(data).__name__}"
            )
        unknown = sorted(set(data) - set(Settings.model_fields))
        if unknown:
            raise ConfigurationError(
                f"unknown setting(s) {', '.join(unknown)} in {path}; "
                f"valid names are the fields of consumer.Settings"
            )
        return data

    def get_field_value(
        self, field: FieldInfo, field_name: str
    ) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


class Settings(BaseSettings):
    """Every option of the consumer, the CLI and the bundled handlers."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True
    )

    env: Env = "dev"

    # Where to connect. A connection string wins over a namespace with Azure AD
    # credentials.
    connection_string: SecretStr | None = None
    fully_qualified_namespace: str | None = None
    entity: str | None = Field(
        default=None, description="Queue or topic name; defaults to orders.{env}.events"
    )
    subscription: str | None = None

    # Session processor.
    max_concurrent_sessions: int = Field(default=8, ge=1, le=1000)
    session_idle_timeout_s: float = Field(default=5.0, gt=0)
    max_lock_renewal_s: float = Field(default=300.0, ge=0)
    prefetch_count: int = Field(default=0, ge=0, le=10_000)
    max_delivery_count: int = Field(default=10, ge=1)
    accept_timeout_s: float = Field(default=5.0, gt=0)
    # Sessions accepted ahead of the workers, on top of max_concurrent_sessions. An
    # accept with azure-servicebus 7.15.0 takes about 0.7 s, mostly waiting (the SDK
    # reads one frame per 0.05 s while it opens), and a short order about 0.05 s. With
    # 16 accepts in flight, 8 workers turned over 17 single-event orders/s against 9
    # with 8 (local broker, 2 vCPUs, bench/run.py's turnover workload). Waiting
    # sessions stay locked, so lower this when orders are long and replicas many.
    standby_sessions: int = Field(default=16, ge=0, le=1000)
    unknown_event_policy: Literal["dead_letter", "ignore"] = "dead_letter"

    # Failure semantics.
    retry_attempts: int = Field(default=3, ge=1)
    retry_backoff_s: float = Field(default=0.2, ge=0)
    retry_max_backoff_s: float = Field(default=5.0, ge=0)
    poison_policy: Literal["park", "continue"] = "park"
    checkpoint: bool = True
    handler_timeout_s: float = Field(default=60.0, gt=0)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    max_disconnected_s: float = Field(default=120.0, gt=0)
    # Retries inside azure-servicebus for each operation (connect, receive, settle,
    # session state), on top of the consumer's own reconnect loop. The defaults are
    # those of azure-servicebus 7.15.0. With them a refused connection fails after
    # about 11 s, measured against a closed port of 127.0.0.1.
    transport_retry_attempts: int = Field(default=3, ge=0, le=100)
    transport_retry_backoff_s: float = Field(default=0.8, ge=0)
    transport_retry_max_backoff_s: float = Field(default=120.0, ge=0)

    # Input limits, applied before JSON parsing.
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    max_json_depth: int = Field(default=32, ge=4)

    # Operations.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    log_format: Literal["console", "json"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Bundled handlers.
    store_path: str = "var/orders-{env}.sqlite3"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        init_values = init_settings()
        env = init_values.get("env") or os.environ.get(f"{ENV_PREFIX}ENV") or "dev"
        return (init_settings, env_settings, _YamlSource(settings_cls, str(env)))

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.connection_string is None and not self.fully_qualified_namespace:
            raise ValueError(
                "no broker configured: set connection_string "
                f"({ENV_PREFIX}CONNECTION_STRING) or fully_qualified_namespace "
                f"({ENV_PREFIX}FULLY_QUALIFIED_NAMESPACE)"
            )
        if self.retry_max_backoff_s < self.retry_backoff_s:
            raise ValueError(
                f"retry_max_backoff_s ({self.retry_max_backoff_s}) must be >= "
                f"retry_backoff_s ({self.retry_backoff_s})"
            )
        budget = self.retry_budget_s()
        if self.max_lock_renewal_s and budget > self.max_lock_renewal_s:
            raise ValueError(
                f"the retry budget of {budget:.1f}s "
                f"(retry_attempts={self.retry_attempts}, "
                f"handler_timeout_s={self.handler_timeout_s}, backoff up to "
                f"{self.retry_max_backoff_s}s) is longer than max_lock_renewal_s="
                f"{self.max_lock_renewal_s}; lower the retries or raise the renewal "
                "limit"
            )
        return self

    def retry_budget_s(self) -> float:
        """Return the longest time one message can spend in in-process attempts."""
        backoff = 0.0
        for attempt in range(1, self.retry_attempts):
            backoff += min(
                self.retry_backoff_s * 2 ** (attempt - 1), self.retry_max_backoff_s
            )
        return self.retry_attempts * self.handler_timeout_s + backoff

    @property
    def entity_name(self) -> str:
        """Queue or topic to consume: `entity`, or `orders.{env}.events` when unset."""
        return self.entity or f"orders.{self.env}.events"

    @property
    def effective_log_format(self) -> Literal["console", "json"]:
        """The log format: `log_format`, or console in dev and JSON elsewhere."""
        if self.log_format is not None:
            return self.log_format
        return "console" if self.env == "dev" else "json"

    @property
    def store_file(self) -> Path:
        """Path of the bundled handlers' SQLite store with `{env}` filled in."""
        return Path(self.store_path.format(env=self.env))

    def describe(self) -> dict[str, Any]:
        """Return the settings for a log line, the connection string masked."""
        values = self.model_dump(exclude={"connection_string"})
        values["connection_string"] = "***" if self.connection_string else None
        return values


def load_settings(env: str | None = None, **overrides: Any) -> Settings:
    """Build `Settings`, turning validation errors into one `ConfigurationError`.

    The message lists each invalid field with the reason and the environment variable
    that sets it, and never contains the value of a secret.
    """
    if env is not None:
        overrides["env"] = env
    try:
        return Settings(**overrides)
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"]) or "settings"
            hint = f" (env var {ENV_PREFIX}{field.upper()})" if problem["loc"] else ""
            lines.append(f"  {field}: {problem['msg']}{hint}")
        raise ConfigurationError(
            "invalid configuration:\n" + "\n".join(lines)
        ) from None
