"""Entity configuration of the local broker.

Entities come from code (`QueueConfig`, `TopicConfig`), from `--entity NAME` on the
command line, or from a file in the layout of the official Service Bus emulator's
`Config.json`: `UserConfig.Namespaces[].Queues[]` and `.Topics[]`, each with a `Name`
and `Properties`, and topics with `Subscriptions[]` that carry `Rules[]`. A property
that this broker does not implement is rejected with its name, never ignored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_ENTITY = "orders.dev.events"
DEFAULT_LOCK_DURATION_S = 30.0
DEFAULT_MAX_DELIVERY_COUNT = 10
# Service Bus standard tier limit for one message.
DEFAULT_MAX_MESSAGE_SIZE_BYTES = 256 * 1024
DEFAULT_DUPLICATE_WINDOW_S = 600.0


class BrokerConfigError(ValueError):
    """Invalid entity configuration, raised before the broker starts."""


@dataclass(frozen=True)
class QueueSettings:
    """Receive-side properties shared by queues and subscriptions."""

    requires_session: bool = True
    lock_duration_s: float = DEFAULT_LOCK_DURATION_S
    max_delivery_count: int = DEFAULT_MAX_DELIVERY_COUNT
    default_ttl_s: float | None = None
    dead_letter_on_expiration: bool = False


@dataclass(frozen=True)
class CorrelationFilter:
    """Correlation filter of a subscription rule: every field that is set must match."""

    subject: str | None = None
    correlation_id: str | None = None
    message_id: str | None = None
    to: str | None = None
    reply_to: str | None = None
    session_id: str | None = None
    content_type: str | None = None
    properties: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class SubscriptionConfig:
    """One subscription of a topic. No rules means every message matches."""

    name: str
    settings: QueueSettings = field(default_factory=QueueSettings)
    rules: tuple[CorrelationFilter, ...] = ()


@dataclass(frozen=True)
class QueueConfig:
    """A queue, session-enabled unless `settings.requires_session` is false."""

    name: str
    settings: QueueSettings = field(default_factory=QueueSettings)
    duplicate_detection: bool = False
    duplicate_window_s: float = DEFAULT_DUPLICATE_WINDOW_S
    max_message_size_bytes: int = DEFAULT_MAX_MESSAGE_SIZE_BYTES


@dataclass(frozen=True)
class TopicConfig:
    """A topic that copies each message to every subscription whose rules match."""

    name: str
    subscriptions: tuple[SubscriptionConfig, ...] = ()
    duplicate_detection: bool = False
    duplicate_window_s: float = DEFAULT_DUPLICATE_WINDOW_S
    max_message_size_bytes: int = DEFAULT_MAX_MESSAGE_SIZE_BYTES


EntityConfig = QueueConfig | TopicConfig

_DURATION = re.compile(
    r"^P(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?$"
)
_UNIT_SECONDS = {"weeks": 604800, "days": 86400, "hours": 3600, "minutes": 60}


def parse_duration_s(text: str, where: str) -> float:
    """Convert an ISO 8601 duration such as `PT1M` or `P14D` to seconds."""
    match = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if match is None or text.strip() in ("P", "PT"):
        raise BrokerConfigError(
            f"{where}: invalid ISO 8601 duration {text!r}; use a value such as PT1M"
        )
    parts = match.groupdict()
    total = float(parts["seconds"] or 0)
    for unit, seconds in _UNIT_SECONDS.items():
        total += int(parts[unit] or 0) * seconds
    return total


def queue_entities(
    names: list[str],
    lock_duration_s: float = DEFAULT_LOCK_DURATION_S,
    max_delivery_count: int = DEFAULT_MAX_DELIVERY_COUNT,
    requires_session: bool = True,
) -> list[QueueConfig]:
    """Build queue configurations for `names` with the given shared properties."""
    settings = QueueSettings(
        requires_session=requires_session,
        lock_duration_s=lock_duration_s,
        max_delivery_count=max_delivery_count,
    )
    return [QueueConfig(name=name, settings=settings) for name in names]


def load_emulator_config(
    path: Path,
    lock_duration_s: float = DEFAULT_LOCK_DURATION_S,
    max_delivery_count: int = DEFAULT_MAX_DELIVERY_COUNT,
) -> list[EntityConfig]:
    """Read entities from a Service Bus emulator `Config.json` file.

    `lock_duration_s` and `max_delivery_count` apply where the file leaves them out.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise BrokerConfigError(f"cannot read entity config {path}: {error}") from error
    parser = _EmulatorConfigParser(
        QueueSettings(
            lock_duration_s=lock_duration_s, max_delivery_count=max_delivery_count
        )
    )
    return parser.parse(document)


_QUEUE_PROPERTIES = {
    "RequiresSession",
    "LockDuration",
    "MaxDeliveryCount",
    "DefaultMessageTimeToLive",
    "DeadLetteringOnMessageExpiration",
    "RequiresDuplicateDetection",
    "DuplicateDetectionHistoryTimeWindow",
    "ForwardTo",
    "ForwardDeadLetteredMessagesTo",
}
_TOPIC_PROPERTIES = {
    "DefaultMessageTimeToLive",
    "RequiresDuplicateDetection",
    "DuplicateDetectionHistoryTimeWindow",
}
_SUBSCRIPTION_PROPERTIES = _QUEUE_PROPERTIES - {
    "RequiresDuplicateDetection",
    "DuplicateDetectionHistoryTimeWindow",
}
_CORRELATION_FIELDS = {
    "Label": "subject",
    "CorrelationId": "correlation_id",
    "MessageId": "message_id",
    "To": "to",
    "ReplyTo": "reply_to",
    "SessionId": "session_id",
    "ContentType": "content_type",
}


class _EmulatorConfigParser:
    """Translate the emulator's JSON document into entity configurations."""

    def __init__(self, defaults: QueueSettings) -> None:
        self._defaults = defaults

    def parse(self, document: Any) -> list[EntityConfig]:
        user_config = _mapping(document, "root").get("UserConfig")
        namespaces = _mapping(user_config, "UserConfig").get("Namespaces", [])
        entities: list[EntityConfig] = []
        for index, namespace in enumerate(_list(namespaces, "UserConfig.Namespaces")):
            where = f"UserConfig.Namespaces[{index}]"
            namespace = _mapping(namespace, where)
            _reject_unknown(namespace, {"Name", "Queues", "Topics"}, where)
            for position, queue in enumerate(
                _list(namespace.get("Queues", []), f"{where}.Queues")
            ):
                entities.append(self._queue(queue, f"{where}.Queues[{position}]"))
            for position, topic in enumerate(
                _list(namespace.get("Topics", []), f"{where}.Topics")
            ):
                entities.append(self._topic(topic, f"{where}.Topics[{position}]"))
        return entities

    def _queue(self, raw: Any, where: str) -> QueueConfig:
        name, properties = _named(raw, where, {"Name", "Properties"})
        _reject_unknown(properties, _QUEUE_PROPERTIES, f"{where}.Properties")
        window = properties.get("DuplicateDetectionHistoryTimeWindow")
        return QueueConfig(
            name=name,
            settings=self._settings(properties, f"{where}.Properties"),
            duplicate_detection=bool(
                properties.get("RequiresDuplicateDetection", False)
            ),
            duplicate_window_s=(
                parse_duration_s(window, f"{where}.Properties")
                if window
                else DEFAULT_DUPLICATE_WINDOW_S
            ),
        )

    def _topic(self, raw: Any, where: str) -> TopicConfig:
        name, properties = _named(raw, where, {"Name", "Properties", "Subscriptions"})
        _reject_unknown(properties, _TOPIC_PROPERTIES, f"{where}.Properties")
        topic_ttl = properties.get("DefaultMessageTimeToLive")
        subscriptions = []
        raw_subscriptions = _list(
            raw.get("Subscriptions", []), f"{where}.Subscriptions"
        )
        for position, subscription in enumerate(raw_subscriptions):
            subscriptions.append(
                self._subscription(
                    subscription, f"{where}.Subscriptions[{position}]", topic_ttl
                )
            )
        window = properties.get("DuplicateDetectionHistoryTimeWindow")
        return TopicConfig(
            name=name,
            subscriptions=tuple(subscriptions),
            duplicate_detection=bool(
                properties.get("RequiresDuplicateDetection", False)
            ),
            duplicate_window_s=(
                parse_duration_s(window, f"{where}.Properties")
                if window
                else DEFAULT_DUPLICATE_WINDOW_S
            ),
        )

    def _subscription(
        self, raw: Any, where: str, topic_ttl: str | None
    ) -> SubscriptionConfig:
        name, properties = _named(raw, where, {"Name", "Properties", "Rules"})
        _reject_unknown(properties, _SUBSCRIPTION_PROPERTIES, f"{where}.Properties")
        if topic_ttl and "DefaultMessageTimeToLive" not in properties:
            properties = {**properties, "DefaultMessageTimeToLive": topic_ttl}
        rules = tuple(
            _correlation_rule(rule, f"{where}.Rules[{position}]")
            for position, rule in enumerate(
                _list(raw.get("Rules", []), f"{where}.Rules")
            )
        )
        return SubscriptionConfig(
            name=name,
            settings=self._settings(properties, f"{where}.Properties"),
            rules=rules,
        )

    def _settings(self, properties: dict[str, Any], where: str) -> QueueSettings:
        for forward in ("ForwardTo", "ForwardDeadLetteredMessagesTo"):
            if properties.get(forward):
                raise BrokerConfigError(
                    f"{where}.{forward}: auto-forwarding is not supported by the local "
                    "broker; remove the property or leave it empty"
                )
        lock = properties.get("LockDuration")
        ttl = properties.get("DefaultMessageTimeToLive")
        max_count = properties.get(
            "MaxDeliveryCount", self._defaults.max_delivery_count
        )
        if not isinstance(max_count, int) or max_count < 1:
            raise BrokerConfigError(
                f"{where}.MaxDeliveryCount: expected an integer >= 1, got {max_count!r}"
            )
        return QueueSettings(
            requires_session=bool(properties.get("RequiresSession", False)),
            lock_duration_s=(
                parse_duration_s(lock, f"{where}.LockDuration")
                if lock
                else self._defaults.lock_duration_s
            ),
            max_delivery_count=max_count,
            default_ttl_s=(
                parse_duration_s(ttl, f"{where}.DefaultMessageTimeToLive")
                if ttl
                else None
            ),
            dead_letter_on_expiration=bool(
                properties.get("DeadLetteringOnMessageExpiration", False)
            ),
        )


def _correlation_rule(raw: Any, where: str) -> CorrelationFilter:
    _, properties = _named(raw, where, {"Name", "Properties"})
    _reject_unknown(
        properties, {"FilterType", "CorrelationFilter"}, f"{where}.Properties"
    )
    filter_type = properties.get("FilterType", "Correlation")
    if filter_type != "Correlation":
        raise BrokerConfigError(
            f"{where}.Properties.FilterType: {filter_type!r} is not supported; "
            "the local broker implements only Correlation filters"
        )
    raw_filter = _mapping(
        properties.get("CorrelationFilter", {}), f"{where}.Properties.CorrelationFilter"
    )
    _reject_unknown(
        raw_filter,
        set(_CORRELATION_FIELDS) | {"Properties"},
        f"{where}.Properties.CorrelationFilter",
    )
    values = {
        attribute: raw_filter[key]
        for key, attribute in _CORRELATION_FIELDS.items()
        if raw_filter.get(key) not in (None, "")
    }
    user_properties = _mapping(
        raw_filter.get("Properties", {}),
        f"{where}.Properties.CorrelationFilter.Properties",
    )
    return CorrelationFilter(
        **values, properties=tuple(sorted(user_properties.items()))
    )


def _named(raw: Any, where: str, allowed: set[str]) -> tuple[str, dict[str, Any]]:
    entry = _mapping(raw, where)
    _reject_unknown(entry, allowed, where)
    name = entry.get("Name")
    if not isinstance(name, str) or not name:
        raise BrokerConfigError(f"{where}.Name: missing or not a string")
    return name, _mapping(entry.get("Properties", {}), f"{where}.Properties")


def _reject_unknown(values: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise BrokerConfigError(
            f"{where}: unsupported propert{'y' if len(unknown) == 1 else 'ies'} "
            f"{', '.join(unknown)}; supported: {', '.join(sorted(allowed))}"
        )


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BrokerConfigError(f"{where}: expected a JSON object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise BrokerConfigError(f"{where}: expected a JSON array")
    return value
