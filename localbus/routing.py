"""Send targets: where a message sent to a queue or topic is stored.

A queue stores each message once. A topic copies it to every subscription with a
matching correlation filter, or to every subscription that has no rules. Both detect
duplicate message ids inside a time window when the entity enables it.
"""

from __future__ import annotations

from localbus.config import (
    CorrelationFilter,
    EntityConfig,
    QueueConfig,
    QueueSettings,
)
from localbus.messages import IncomingMessage


class SendTarget:
    """A queue or topic as seen by senders."""

    def __init__(self, entity: EntityConfig) -> None:
        self.name = entity.name.lower()
        self.config = entity
        self.max_message_size_bytes = entity.max_message_size_bytes
        self.store_settings: dict[str, QueueSettings] = {}
        self._rules: dict[str, tuple[CorrelationFilter, ...]] = {}
        # message id -> epoch ms when it leaves the duplicate detection window
        self._seen_ids: dict[str, int] = {}
        if isinstance(entity, QueueConfig):
            self.store_settings[self.name] = entity.settings
            self._rules[self.name] = ()
            return
        for subscription in entity.subscriptions:
            path = f"{self.name}/subscriptions/{subscription.name.lower()}"
            self.store_settings[path] = subscription.settings
            self._rules[path] = subscription.rules

    def matching_stores(self, message: IncomingMessage) -> list[str]:
        """Return the store paths that receive a copy of `message`."""
        return [
            path
            for path, rules in self._rules.items()
            if not rules or any(_matches(rule, message) for rule in rules)
        ]

    def is_duplicate(self, message_id: str | None, now_ms: int) -> bool:
        """Record `message_id`; tell whether it was seen inside the window."""
        if not self.config.duplicate_detection or message_id is None:
            return False
        self._forget_expired_ids(now_ms)
        expires = self._seen_ids.get(message_id)
        if expires is not None and expires > now_ms:
            return True
        self._seen_ids[message_id] = now_ms + int(self.config.duplicate_window_s * 1000)
        return False

    def _forget_expired_ids(self, now_ms: int) -> None:
        # Ids are inserted in time order with one window, so expired ones come first.
        while self._seen_ids:
            oldest = next(iter(self._seen_ids))
            if self._seen_ids[oldest] > now_ms:
                return
            del self._seen_ids[oldest]


def build_targets(entity: EntityConfig) -> SendTarget:
    """Create the send target of `entity`."""
    return SendTarget(entity)


def _matches(rule: CorrelationFilter, message: IncomingMessage) -> bool:
    pairs = (
        (rule.subject, message.subject),
        (rule.correlation_id, message.correlation_id),
        (rule.message_id, message.message_id),
        (rule.to, message.to),
        (rule.reply_to, message.reply_to),
        (rule.session_id, message.session_id),
        (rule.content_type, message.content_type),
    )
    for expected, actual in pairs:
        if expected is not None and expected != actual:
            return False
    properties = dict(message.application_properties)
    return all(properties.get(key) == value for key, value in rule.properties)
