"""SQLite journal for `--data-dir`: entities, messages, session state, schedules.

Every change is written before the broker replies to the client, in autocommit mode
with a write-ahead log, so a restarted broker finds what a killed one had accepted.
Lock tokens are not stored: after a restart every message is available again, as it
would be once its lock expired. The `locks` table only records which messages were
delivered under a lock, so that the restarted broker counts that delivery.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from localbus.config import (
    CorrelationFilter,
    EntityConfig,
    QueueConfig,
    QueueSettings,
    SubscriptionConfig,
    TopicConfig,
)
from localbus.messages import IncomingMessage, Message, MessageStatus

DATABASE_NAME = "localbus.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entities (name TEXT PRIMARY KEY, config TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    store TEXT NOT NULL,
    sequence_number INTEGER NOT NULL,
    payload BLOB NOT NULL,
    fields TEXT NOT NULL,
    PRIMARY KEY (store, sequence_number)
);
CREATE TABLE IF NOT EXISTS session_states (
    store TEXT NOT NULL,
    session_id TEXT NOT NULL,
    state BLOB NOT NULL,
    PRIMARY KEY (store, session_id)
);
CREATE TABLE IF NOT EXISTS scheduled (
    sequence_number INTEGER PRIMARY KEY,
    target TEXT NOT NULL,
    payload BLOB NOT NULL,
    fields TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS locks (
    store TEXT NOT NULL,
    sequence_number INTEGER NOT NULL,
    PRIMARY KEY (store, sequence_number)
);
"""
_MESSAGE_FIELDS = (
    "message_id",
    "session_id",
    "enqueued_at_ms",
    "expires_at_ms",
    "scheduled_at_ms",
    "delivery_count",
    "dead_letter_reason",
    "dead_letter_description",
    "dead_letter_source",
)


class SqliteJournal:
    """Journal stored in `<data_dir>/localbus.sqlite3`."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / DATABASE_NAME
        # The broker uses the journal from its one event thread, which may not be
        # the thread that created it.
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        # The rows of `locks`, so that storing or removing a message that was
        # never locked costs no extra statement.
        self._locked: set[tuple[str, int]] = {
            (store, number)
            for store, number in self._db.execute(
                "SELECT store, sequence_number FROM locks"
            )
        }

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def entity_added(self, entity: EntityConfig) -> None:
        kind = "queue" if isinstance(entity, QueueConfig) else "topic"
        config = json.dumps({"kind": kind, **asdict(entity)})
        self._db.execute(
            "INSERT OR REPLACE INTO entities (name, config) VALUES (?, ?)",
            (entity.name.lower(), config),
        )

    def stored_entities(self) -> list[EntityConfig]:
        """Return the entities a previous run created."""
        rows = self._db.execute("SELECT config FROM entities ORDER BY name")
        return [_entity_from_json(json.loads(config)) for (config,) in rows]

    def message_stored(self, store: str, message: Message) -> None:
        fields = {name: getattr(message, name) for name in _MESSAGE_FIELDS}
        fields["deferred"] = message.status in (
            MessageStatus.DEFERRED,
            MessageStatus.DEFERRED_LOCKED,
        )
        with self._ending_lock(store, message.sequence_number):
            self._db.execute(
                "INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?)",
                (store, message.sequence_number, message.payload, json.dumps(fields)),
            )
            self._raise_sequence(message.sequence_number)

    def message_removed(self, store: str, sequence_number: int) -> None:
        with self._ending_lock(store, sequence_number):
            self._db.execute(
                "DELETE FROM messages WHERE store = ? AND sequence_number = ?",
                (store, sequence_number),
            )

    def message_locked(self, store: str, sequence_number: int) -> None:
        if (store, sequence_number) in self._locked:
            return
        self._db.execute(
            "INSERT OR IGNORE INTO locks VALUES (?, ?)", (store, sequence_number)
        )
        self._locked.add((store, sequence_number))

    def locked_messages(self) -> Iterable[tuple[str, int]]:
        return sorted(self._locked)

    @contextlib.contextmanager
    def _ending_lock(self, store: str, sequence_number: int) -> Iterator[None]:
        """Delete the message's lock row, if any, in one transaction with the change.

        A crash between the two writes would otherwise count the delivery again
        at the next start.
        """
        if (store, sequence_number) not in self._locked:
            yield
            return
        self._db.execute("BEGIN")
        try:
            yield
            self._db.execute(
                "DELETE FROM locks WHERE store = ? AND sequence_number = ?",
                (store, sequence_number),
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self._locked.discard((store, sequence_number))

    def session_state_stored(
        self, store: str, session_id: str, state: bytes | None
    ) -> None:
        if state is None:
            self._db.execute(
                "DELETE FROM session_states WHERE store = ? AND session_id = ?",
                (store, session_id),
            )
            return
        self._db.execute(
            "INSERT OR REPLACE INTO session_states VALUES (?, ?, ?)",
            (store, session_id, state),
        )

    def scheduled_stored(
        self, target: str, sequence_number: int, message: IncomingMessage
    ) -> None:
        fields = {
            name: value for name, value in asdict(message).items() if name != "payload"
        }
        self._db.execute(
            "INSERT OR REPLACE INTO scheduled VALUES (?, ?, ?, ?)",
            (sequence_number, target, message.payload, json.dumps(fields, default=str)),
        )
        self._raise_sequence(sequence_number)

    def scheduled_removed(self, sequence_number: int) -> None:
        self._db.execute(
            "DELETE FROM scheduled WHERE sequence_number = ?", (sequence_number,)
        )

    def last_sequence_number(self) -> int:
        row = self._db.execute(
            "SELECT value FROM counters WHERE name = 'sequence'"
        ).fetchone()
        return int(row[0]) if row else 0

    def stored_messages(self) -> Iterable[tuple[str, Message]]:
        rows = self._db.execute(
            "SELECT store, sequence_number, payload, fields FROM messages "
            "ORDER BY sequence_number"
        )
        for store, number, payload, encoded in rows.fetchall():
            fields = json.loads(encoded)
            deferred = fields.pop("deferred", False)
            message = Message(sequence_number=number, payload=bytes(payload), **fields)
            if deferred:
                message.status = MessageStatus.DEFERRED
            yield store, message

    def session_states(self) -> Iterable[tuple[str, str, bytes]]:
        rows = self._db.execute("SELECT store, session_id, state FROM session_states")
        return [(store, session, bytes(state)) for store, session, state in rows]

    def scheduled_messages(self) -> Iterable[tuple[str, int, IncomingMessage]]:
        rows = self._db.execute(
            "SELECT sequence_number, target, payload, fields FROM scheduled"
        )
        for number, target, payload, encoded in rows.fetchall():
            fields = json.loads(encoded)
            fields["application_properties"] = tuple(
                tuple(pair) for pair in fields.get("application_properties", ())
            )
            yield target, number, IncomingMessage(payload=bytes(payload), **fields)

    def _raise_sequence(self, sequence_number: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES ('sequence', ?) "
            "ON CONFLICT(name) DO UPDATE SET value = max(value, excluded.value)",
            (sequence_number,),
        )


def _entity_from_json(data: dict[str, Any]) -> EntityConfig:
    kind = data.pop("kind")
    if kind == "queue":
        settings = QueueSettings(**data.pop("settings"))
        return QueueConfig(settings=settings, **data)
    subscriptions = tuple(
        SubscriptionConfig(
            name=item["name"],
            settings=QueueSettings(**item["settings"]),
            rules=tuple(
                CorrelationFilter(
                    **{
                        **rule,
                        "properties": tuple(tuple(p) for p in rule["properties"]),
                    }
                )
                for rule in item["rules"]
            ),
        )
        for item in data.pop("subscriptions")
    )
    return TopicConfig(subscriptions=subscriptions, **data)
