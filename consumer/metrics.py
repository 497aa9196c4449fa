"""Prometheus collectors of the consumer, on a registry the caller controls.

Every name starts with `orders_consumer_`. Durations are in seconds. Labels are
bounded: `entity`, `event_type` (the known event types or "unknown"), `reason` (known
reasons, then at most `MAX_EXTRA_REASONS` other names, then "other"), `outcome` and
`kind`. An order id, message id or session id is never a label value, because each
would create a new series.
"""

from __future__ import annotations

import re
import threading
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from consumer.events import EVENT_TYPES

PREFIX = "orders_consumer_"

# Handler latencies range from a cache hit (about 1 ms) to a slow downstream call near
# the default handler timeout of 60 s. The top buckets catch messages close to the
# default lock-renewal limit of 300 s.
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
# End-to-end lag adds the time a message waited in the queue, which grows to minutes
# during a backlog, so its buckets continue to 15 minutes.
LAG_BUCKETS_S: tuple[float, ...] = DURATION_BUCKETS_S + (600.0, 900.0)

UNKNOWN_EVENT_TYPE = "unknown"

# Dead-letter reasons that the framework itself sets.
KNOWN_REASONS: frozenset[str] = frozenset(
    {
        "MalformedBody",
        "SchemaValidationFailed",
        "UnknownEventType",
        "SessionMismatch",
        "MaxRetriesExceeded",
        "OutOfOrder",
    }
)
OTHER_REASON = "other"
# Reasons chosen by handlers (`DeadLetter(reason)` or a `PermanentError` subclass name)
# pass as labels until this many distinct ones have been seen by one `ConsumerMetrics`.
MAX_EXTRA_REASONS = 32
# A reason label must look like an identifier, so free text never becomes a series.
_REASON_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")

ENTITY = ("entity",)
BY_EVENT = ("entity", "event_type")

CollectorT = TypeVar("CollectorT", Counter, Gauge, Histogram)


def event_type_label(value: str | None) -> str:
    """Return `value` when it is a known event type, else "unknown"."""
    if value is not None and value in EVENT_TYPES:
        return value
    return UNKNOWN_EVENT_TYPE


class ConsumerMetrics:
    """The consumer's Prometheus collectors, registered on one registry.

    Without a `registry` argument a fresh `CollectorRegistry` is created, so two
    instances (two apps, or two tests) never share series. Pass
    `prometheus_client.REGISTRY` to publish on the process-wide default registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._extra_reasons: set[str] = set()
        self._reasons_lock = threading.Lock()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._add_message_metrics()
        self._add_handler_metrics()
        self._add_session_metrics()
        self._add_connection_metrics()

    def _counter(self, name: str, doc: str, labels: tuple[str, ...]) -> Counter:
        return Counter(PREFIX + name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
        return Gauge(PREFIX + name, doc, labels, registry=self.registry)

    def _add_message_metrics(self) -> None:
        self.messages_received = self._counter(
            "messages_received", "Messages received from the broker.", BY_EVENT
        )
        self.messages_completed = self._counter(
            "messages_completed", "Messages completed after handling.", BY_EVENT
        )
        self.messages_abandoned = self._counter(
            "messages_abandoned",
            "Messages abandoned so the broker delivers them again.",
            BY_EVENT,
        )
        self.messages_dead_lettered = self._counter(
            "messages_dead_lettered",
            "Messages moved to the dead-letter queue, by dead-letter reason.",
            BY_EVENT + ("reason",),
        )
        self.messages_deferred = self._counter(
            "messages_deferred",
            "Messages deferred because their session is parked.",
            BY_EVENT,
        )
        self.messages_duplicate = self._counter(
            "messages_duplicate",
            "Messages completed without running handlers because the session "
            "checkpoint shows them as already handled.",
            BY_EVENT,
        )
        self.messages_ignored = self._counter(
            "messages_ignored",
            "Messages of an unknown event type completed without handling "
            "(unknown_event_policy=ignore).",
            BY_EVENT,
        )

    def _add_handler_metrics(self) -> None:
        self.handler_duration = Histogram(
            PREFIX + "handler_duration_seconds",
            "Time spent in the handlers of one message, per attempt.",
            BY_EVENT,
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.end_to_end_lag = Histogram(
            PREFIX + "end_to_end_lag_seconds",
            "Time from the broker's enqueued time to the message's settlement.",
            BY_EVENT,
            buckets=LAG_BUCKETS_S,
            registry=self.registry,
        )
        self.handler_attempts = self._counter(
            "handler_attempts",
            "Handler attempts by outcome (for example success, retry, timeout, "
            "dead_letter, crash).",
            BY_EVENT + ("outcome",),
        )
        self.handlers_in_flight = self._gauge(
            "handlers_in_flight", "Handler calls running now.", ENTITY
        )

    def _add_session_metrics(self) -> None:
        self.sessions_held = self._gauge(
            "sessions_held", "Sessions whose lock this process holds now.", ENTITY
        )
        self.sessions_parked = self._gauge(
            "sessions_parked",
            "Sessions parked after a dead-letter, seen by this process.",
            ENTITY,
        )
        self.sessions_accepted = self._counter(
            "sessions_accepted", "Session locks acquired.", ENTITY
        )
        self.sessions_released = self._counter(
            "sessions_released",
            "Sessions closed by this process (idle or shutdown).",
            ENTITY,
        )
        self.sessions_lost = self._counter(
            "sessions_lost",
            "Session locks lost before the session was released.",
            ENTITY,
        )
        self.lock_renewals = self._counter(
            "lock_renewals",
            "Successful lock renewals by kind (session or message).",
            ENTITY + ("kind",),
        )
        self.lock_renewal_failures = self._counter(
            "lock_renewal_failures",
            "Failed lock renewals by kind (session or message).",
            ENTITY + ("kind",),
        )

    def _add_connection_metrics(self) -> None:
        self.connection_up = self._gauge(
            "connection_up", "1 while connected to the broker, else 0.", ENTITY
        )
        self.reconnects = self._counter(
            "reconnects", "Connections re-established after a transport error.", ENTITY
        )

    def child(self, collector: CollectorT, *label_values: str) -> CollectorT:
        """Return `collector.labels(*label_values)`, looked up once and then cached.

        `labels()` converts the values and takes a lock on every call, several times
        per message on the hot path. Children stay cached for the life of this
        object, which the bounded label values keep small. The series appears in the
        registry at the first call, as it does with `labels()`.
        """
        key = (collector, label_values)
        found = self._children.get(key)
        if found is None:
            found = collector.labels(*label_values)
            self._children[key] = found
        return found

    def reason_label(self, reason: str | None) -> str:
        """Return a bounded `reason` label value for a dead-letter reason.

        Known framework reasons always pass. Other identifier-like reasons pass until
        `MAX_EXTRA_REASONS` distinct ones have been seen. After that, new ones become
        "other", as does anything that is not an identifier (free text, empty, None).
        """
        if not reason:
            return OTHER_REASON
        if reason in KNOWN_REASONS:
            return reason
        if _REASON_PATTERN.fullmatch(reason) is None:
            return OTHER_REASON
        with self._reasons_lock:
            if reason in self._extra_reasons:
                return reason
            if len(self._extra_reasons) >= MAX_EXTRA_REASONS:
                return OTHER_REASON
            self._extra_reasons.add(reason)
        return reason

    def value(self, name: str, **labels: str) -> float:
        """Return the current value of one series, 0.0 when it was never touched.

        `name` is an attribute name such as "messages_completed" or a full sample name
        such as "orders_consumer_handler_duration_seconds_sum". A counter returns its
        total, a gauge its value and a histogram its observation count.
        """
        sample = self._sample_name(name)
        result = self.registry.get_sample_value(sample, labels)

        return 0.0 if result is None else result

    def _sample_name(self, name: str) -> str:
        collector = getattr(self, name, None)
        if isinstance(collector, Counter | Gauge | Histogram):
            [description] = collector.describe()
            family: str = description.name
            if isinstance(collector, Counter):
                return f"{family}_total"
            if isinstance(collector, Histogram):
                return f"{family}_count"
            return family
        if name.startswith(PREFIX):
            return name
        raise ValueError(
            f"unknown metric {name!r}: use a ConsumerMetrics attribute name such as "
            "'messages_completed' or a sample name starting with "
            f"{PREFIX!r}"
        )
