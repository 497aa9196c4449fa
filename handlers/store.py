"""SQLite store of the per-order projections kept by the bundled handlers.

Each `apply` runs in one transaction: it checks whether the message id was already
applied to the order, runs the transition rules and writes the new projection together
with the message id. A redelivered message therefore changes nothing, and a rejected
event leaves the order untouched. One connection is shared under a lock, because sync
handlers of concurrent sessions call the store from several threads.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import astuple, fields
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any, get_type_hints

from consumer.events import Event
from handlers.projection import OrderStatus, Projection, apply_event

_COLUMNS = tuple(field.name for field in fields(Projection))
_DECIMAL_COLUMNS = frozenset(
    name for name, kind in get_type_hints(Projection).items() if kind is Decimal
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS order_projection (
    {", ".join(_COLUMNS)},
    PRIMARY KEY (order_id)
);
CREATE TABLE IF NOT EXISTS applied_message (
    order_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    PRIMARY KEY (order_id, message_id)
);
"""


def _to_row(projection: Projection) -> tuple[Any, ...]:
    # Decimals are stored as text so that amounts stay exact.
    return tuple(
        str(value) if isinstance(value, Decimal | Enum) else value
        for value in astuple(projection)
    )


def _from_row(row: tuple[Any, ...]) -> Projection:
    values = dict(zip(_COLUMNS, row, strict=True))
    for name in _DECIMAL_COLUMNS:
        values[name] = Decimal(values[name])
    values["status"] = OrderStatus(values["status"])
    return Projection(**values)


class ProjectionStore:
    """Order projections in a SQLite file, safe to share between threads.

    Several processes may also share the file: SQLite serializes their transactions,
    and a writer waits up to `busy_timeout_s` for the lock before failing.
    """

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(
            str(path),
            timeout=busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
        )
        with self._lock:
            if str(path) != ":memory:":
                self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.executescript(_SCHEMA)

    def apply(self, event: Event[Any], message_id: str) -> Projection | None:
        """Apply `event` delivered as `message_id`; return the new projection.

        Returns None, and changes nothing, when this message id was already applied to
        the order. Raises `InvalidTransition` when the rules reject the event.
        """
        order_id = event.order_id
        with self._lock:
            cursor = self._connection.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                if self._was_applied(cursor, order_id, message_id):
                    cursor.execute("ROLLBACK")
                    return None
                updated = apply_event(self._load(cursor, order_id), event, message_id)
                self._save(cursor, updated)
                cursor.execute(
                    "INSERT INTO applied_message VALUES (?, ?, ?)",
                    (order_id, message_id, event.event_type),
                )
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
        return updated

    @staticmethod
    def _was_applied(cursor: sqlite3.Cursor, order_id: str, message_id: str) -> bool:
        cursor.execute(
            "SELECT 1 FROM applied_message WHERE order_id = ? AND message_id = ?",
            (order_id, message_id),
        )
        return cursor.fetchone() is not None

    @staticmethod
    def _load(cursor: sqlite3.Cursor, order_id: str) -> Projection | None:
        cursor.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM order_projection WHERE order_id = ?",
            (order_id,),
        )
        row = cursor.fetchone()
        return None if row is None else _from_row(row)

    @staticmethod
    def _save(cursor: sqlite3.Cursor, projection: Projection) -> None:
        placeholders = ", ".join("?" for _ in _COLUMNS)
        cursor.execute(
            f"INSERT OR REPLACE INTO order_projection ({', '.join(_COLUMNS)}) "
            f"VALUES ({placeholders})",
            _to_row(projection),
        )

    def get(self, order_id: str) -> Projection | None:
        """Return the projection of `order_id`, or None if the order is unknown."""
        with self._lock:
            return self._load(self._connection.cursor(), order_id)

    def all(self) -> dict[str, Projection]:
        """Return every projection by order id."""
        with self._lock:
            cursor = self._connection.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM order_projection ORDER BY order_id"
            )
            return {row[0]: _from_row(row) for row in cursor.fetchall()}

    def applied_count(self) -> int:
        """Return how many messages were applied in total."""
        with self._lock:
            cursor = self._connection.execute("SELECT COUNT(*) FROM applied_message")
            return int(cursor.fetchone()[0])

    def close(self) -> None:
        """Close the database connection; the store cannot be used afterwards."""
        with self._lock:
            self._connection.close()

    def __enter__(self) -> ProjectionStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
