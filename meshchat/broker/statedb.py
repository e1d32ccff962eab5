"""The SQLite side of the broker's state store: schema, records, checked read-back, batches.

No asyncio and no threads here: `meshchat.broker.persist` runs all of it on its writer thread.
The file holds four tables:

- ``sessions``: the client id of every persistent session (clean session false);
- ``subscriptions``: their topic filters and granted QoS;
- ``queue``: their undelivered or unacknowledged QoS 1 and 2 messages, in order (the row id),
  with the topic, the payload bytes as received (ciphertext; never decoded, never logged),
  the QoS and whether it was sent already (DUP on the next attempt);
- ``retained``: the retained message of each topic (topic, payload, QoS).

The schema version is SQLite's ``user_version``; a newer file than this code knows is refused.
Everything read back is checked and bounded before the broker sees it.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import itertools
import logging
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

from meshchat.errors import BrokerError, ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

__all__ = ["RestoredState", "StoredMessage", "StoredRetained", "StoredSession"]

Connection = sqlite3.Connection
"""The store's open file (the writer thread's own)."""

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
LOCK_WAIT: Final = 0.5
"""Seconds to wait for the file when another broker holds it (it never lets go)."""
MAX_ID_BYTES: Final = 65535
"""Longest client id, topic or topic filter MQTT can carry (a two-byte length)."""
MAX_PAYLOAD: Final = 268_435_455
"""Largest payload an MQTT packet can carry (the remaining-length limit)."""
NO_ROW: Final = 0
_T = TypeVar("_T")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS sessions (client_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscriptions (
    client_id TEXT NOT NULL,
    filter TEXT NOT NULL,
    qos INTEGER NOT NULL,
    PRIMARY KEY (client_id, filter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY,
    client_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    dup INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS queue_by_client ON queue (client_id, id);
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL
) WITHOUT ROWID;
"""


class Kind(enum.IntEnum):
    """What one queued change does."""

    SESSION = 1
    DROP_SESSION = 2
    SUBSCRIBE = 3
    UNSUBSCRIBE = 4
    ENQUEUE = 5
    SENT = 6
    REMOVE = 7
    RETAIN = 8
    UNRETAIN = 9


Change = tuple[Kind, int, str, str, bytes, int]
"""One change for the writer thread: (kind, row, client id, topic or filter, payload, QoS);
the fields a kind does not use are 0 (`NO_ROW`) or empty."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message kept for a persistent session.

    Attributes:
        row: its place in the store; rows of one session are in delivery order.
        topic: the topic it was published to.
        payload: the payload bytes as published.
        qos: the QoS it is delivered with (1 or 2).
        dup: it was sent before, unacknowledged: the next attempt sets DUP.
    """

    row: int
    topic: str
    payload: bytes = field(repr=False)
    qos: int
    dup: bool


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A persistent session as read back: its subscriptions and its queue, oldest first."""

    client_id: str
    subscriptions: tuple[tuple[str, int], ...]
    queue: tuple[StoredMessage, ...]


@dataclass(frozen=True, slots=True)
class StoredRetained:
    """A retained message as read back."""

    topic: str
    payload: bytes = field(repr=False)
    qos: int


@dataclass(frozen=True, slots=True)
class RestoredState:
    """Everything the store held when it was opened."""

    sessions: tuple[StoredSession, ...] = ()
    retained: tuple[StoredRetained, ...] = ()


def _fits(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value.encode("utf-8", "replace")) <= MAX_ID_BYTES


def _topic_name(value: object) -> bool:
    return _fits(value) and isinstance(value, str) and not {"#", "+", "\0"} & set(value)


def _topic_filter(value: object) -> bool:
    return _fits(value) and isinstance(value, str) and "\0" not in value


def _payload(value: object) -> bool:
    return isinstance(value, bytes) and len(value) <= MAX_PAYLOAD


def _qos(value: object, allowed: Iterable[int]) -> bool:
    return type(value) is int and value in allowed


def connect(path: Path) -> Connection:
    """Open (creating it 0600) and lock the store's file, and bring its schema up to date.

    Raises:
        ConfigError: the file cannot be created or used, has a newer schema, or another
            broker holds it.
    """
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            if os.fstat(descriptor).st_mode & 0o077:
                os.fchmod(descriptor, 0o600)
        finally:
            os.close(descriptor)
    except OSError as exc:
        raise ConfigError(f"cannot open the broker state {path}: {exc.strerror or exc}") from exc
    connection = sqlite3.connect(path, timeout=LOCK_WAIT, isolation_level=None)
    try:
        _prepare(connection, path)
    except sqlite3.OperationalError as exc:
        connection.close()
        if "locked" in str(exc):
            raise ConfigError(f"the broker state {path} is in use by another broker") from exc
        raise ConfigError(f"cannot use the broker state {path}: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        connection.close()
        raise ConfigError(f"cannot use the broker state {path}: {exc}") from exc
    except BaseException:
        connection.close()
        raise
    return connection


def _prepare(connection: Connection, path: Path) -> None:
    """Lock the file for this broker, switch to WAL and bring the schema up to date."""
    # Exclusive: no other process may open the file while this broker runs (two brokers on
    # one state would each lose the other's changes); and WAL needs no shared memory then.
    connection.execute("PRAGMA locking_mode=EXCLUSIVE")
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"the broker state {path} has schema version {version}, newer than this "
            f"meshchat's {SCHEMA_VERSION}; upgrade meshchat or move the file away"
        )
    if version < SCHEMA_VERSION:
        connection.executescript(
            f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )


def read_back(connection: Connection, path: Path, max_queue: int) -> tuple[RestoredState, int]:
    """Read the state back, checked and bounded; returns it and the next free queue row.

    A malformed row is skipped and deleted; a session gets back at most `max_queue` messages,
    its newest (the older ones are deleted).

    Raises:
        ConfigError: SQLite cannot read the file.
    """
    try:
        return _Reader(connection, max_queue).read()
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot read the broker state {path}: {exc}") from exc


class _Reader:
    """Reads the state back, checked and bounded, and deletes what it cannot use."""

    def __init__(self, connection: Connection, max_queue: int) -> None:
        self.connection = connection
        self.max_queue = max_queue
        self.skipped = 0

    def read(self) -> tuple[RestoredState, int]:
        """The state and the next free queue row."""
        connection = self.connection
        connection.execute("BEGIN")
        try:
            clients = self._sessions()
            subscriptions = self._subscriptions(clients)
            queues = self._queues(clients)
            retained = self._retained()
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        if self.skipped:
            logger.warning(
                "broker state: %d unusable rows skipped and deleted (malformed or over a bound)",
                self.skipped,
            )
        (last,) = connection.execute("SELECT coalesce(max(id), 0) FROM queue").fetchone()
        sessions = tuple(
            StoredSession(client, tuple(subscriptions[client]), tuple(queues[client]))
            for client in clients
        )
        return RestoredState(sessions, tuple(retained)), int(last) + 1

    def _sessions(self) -> list[str]:
        clients: list[str] = []
        bad: list[object] = []
        for (client_id,) in self.connection.execute("SELECT client_id FROM sessions"):
            (clients if _fits(client_id) else bad).append(client_id)
        for client_id in bad:
            self.connection.execute("DELETE FROM sessions WHERE client_id = ?", (client_id,))
        self.skipped += len(bad)
        # Whatever belongs to no session (or to one just skipped) goes.
        self.skipped += self.connection.execute(
            "DELETE FROM subscriptions WHERE client_id NOT IN (SELECT client_id FROM sessions)"
        ).rowcount
        self.skipped += self.connection.execute(
            "DELETE FROM queue WHERE client_id NOT IN (SELECT client_id FROM sessions)"
        ).rowcount
        return clients

    def _subscriptions(self, clients: list[str]) -> dict[str, list[tuple[str, int]]]:
        found: dict[str, list[tuple[str, int]]] = {client: [] for client in clients}
        bad: list[tuple[object, object]] = []
        rows = self.connection.execute("SELECT client_id, filter, qos FROM subscriptions")
        for client_id, topic_filter, qos in rows:
            if client_id in found and _topic_filter(topic_filter) and _qos(qos, (0, 1, 2)):
                found[client_id].append((topic_filter, qos))
            else:
                bad.append((client_id, topic_filter))
        self.connection.executemany(
            "DELETE FROM subscriptions WHERE client_id = ? AND filter = ?", bad
        )
        self.skipped += len(bad)
        return found

    def _queues(self, clients: list[str]) -> dict[str, collections.deque[StoredMessage]]:
        bound = self.max_queue
        found = {client: collections.deque[StoredMessage](maxlen=bound) for client in clients}
        bad: list[tuple[object]] = []
        rows = self.connection.execute(
            "SELECT id, client_id, topic, payload, qos, dup FROM queue ORDER BY id"
        )
        for row, client_id, topic, payload, qos, dup in rows:
            kept = found.get(client_id)
            if (
                kept is None
                or not _topic_name(topic)
                or not _payload(payload)
                or not _qos(qos, (1, 2))
                or not _qos(dup, (0, 1))
            ):
                bad.append((row,))
                continue
            kept.append(StoredMessage(row, topic, payload, qos, bool(dup)))
        self.connection.executemany("DELETE FROM queue WHERE id = ?", bad)
        self.skipped += len(bad)
        for client_id, kept in found.items():
            if len(kept) == bound:
                # Over the bound (a smaller bound than when they were queued): the oldest go.
                deleted = self.connection.execute(
                    "DELETE FROM queue WHERE client_id = ? AND id < ?", (client_id, kept[0].row)
                ).rowcount
                if deleted:
                    logger.warning(
                        "broker state: client %r had more than %d queued messages; its %d "
                        "oldest are dropped",
                        client_id,
                        bound,
                        deleted,
                    )
        return found

    def _retained(self) -> list[StoredRetained]:
        found: list[StoredRetained] = []
        bad: list[tuple[object]] = []
        for topic, payload, qos in self.connection.execute(
            "SELECT topic, payload, qos FROM retained"
        ):
            if _topic_name(topic) and _payload(payload) and payload and _qos(qos, (0, 1, 2)):
                found.append(StoredRetained(topic, payload, qos))
            else:
                bad.append((topic,))
        self.connection.executemany("DELETE FROM retained WHERE topic = ?", bad)
        self.skipped += len(bad)
        return found


_CHUNKS: Final = (256, 64, 16, 4, 1)
"""Rows per multi-row statement: one statement (one step, one GIL release in the sqlite3
module) per chunk instead of one per row, and only these few statements to prepare."""


_INSERT_ROWS: Final = (
    "INSERT OR REPLACE INTO queue (id, client_id, topic, payload, qos, dup) VALUES "
)


@functools.cache
def _insert_rows(count: int) -> str:
    return _INSERT_ROWS + ", ".join(["(?, ?, ?, ?, ?, ?)"] * count)


@functools.cache
def _rows_where(statement: str, count: int) -> str:
    return statement + " WHERE id IN (" + ", ".join(["?"] * count) + ")"


def _chunked(items: list[_T]) -> Iterator[list[_T]]:
    start = 0
    for size in _CHUNKS:
        while len(items) - start >= size:
            yield items[start : start + size]
            start += size


class _Rows:
    """Queue-row changes of one batch, merged: a row added and removed in it never hits disk."""

    def __init__(self) -> None:
        self.added: dict[int, tuple[int, str, str, bytes, int, int]] = {}
        self.sent: set[int] = set()
        self.removed: set[int] = set()

    def write(self, connection: Connection) -> None:
        for chunk in _chunked(list(self.added.values())):
            connection.execute(_insert_rows(len(chunk)), list(itertools.chain(*chunk)))
        for rows in _chunked(list(self.sent)):
            connection.execute(_rows_where("UPDATE queue SET dup = 1", len(rows)), rows)
        for rows in _chunked(list(self.removed)):
            connection.execute(_rows_where("DELETE FROM queue", len(rows)), rows)
        self.added.clear()
        self.sent.clear()
        self.removed.clear()


def apply(connection: Connection, batch: list[Change]) -> None:
    """Apply one batch of changes in one transaction, in order where order matters.

    Raises:
        BrokerError: the transaction failed and was rolled back: none of the batch is stored.
    """
    try:
        _apply(connection, batch)
    except sqlite3.Error as exc:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")
        raise BrokerError(f"storing {len(batch)} broker state changes failed: {exc}") from exc


def _apply(connection: Connection, batch: list[Change]) -> None:
    rows = _Rows()
    connection.execute("BEGIN")
    for kind, row, client_id, name, payload, qos in batch:
        match kind:
            case Kind.ENQUEUE:
                rows.added[row] = (row, client_id, name, payload, qos, 0)
            case Kind.SENT:
                added = rows.added.get(row)
                if added is not None:
                    rows.added[row] = (*added[:5], 1)
                else:
                    rows.sent.add(row)
            case Kind.REMOVE:
                if rows.added.pop(row, None) is None:
                    rows.removed.add(row)
                rows.sent.discard(row)
            case _:
                rows.write(connection)  # everything queued before this change comes first
                _apply_ordered(connection, kind, client_id, name, payload, qos)
    rows.write(connection)
    connection.execute("COMMIT")


def _apply_ordered(  # noqa: PLR0917  # the fields of one change, unpacked
    connection: Connection, kind: Kind, client_id: str, name: str, payload: bytes, qos: int
) -> None:
    match kind:
        case Kind.SESSION:
            connection.execute(
                "INSERT OR IGNORE INTO sessions (client_id) VALUES (?)", (client_id,)
            )
        case Kind.DROP_SESSION:
            connection.execute("DELETE FROM queue WHERE client_id = ?", (client_id,))
            connection.execute("DELETE FROM subscriptions WHERE client_id = ?", (client_id,))
            connection.execute("DELETE FROM sessions WHERE client_id = ?", (client_id,))
        case Kind.SUBSCRIBE:
            connection.execute(
                "INSERT OR IGNORE INTO sessions (client_id) VALUES (?)", (client_id,)
            )
            connection.execute(
                "INSERT INTO subscriptions (client_id, filter, qos) VALUES (?, ?, ?) "
                "ON CONFLICT (client_id, filter) DO UPDATE SET qos = excluded.qos",
                (client_id, name, qos),
            )
        case Kind.UNSUBSCRIBE:
            connection.execute(
                "DELETE FROM subscriptions WHERE client_id = ? AND filter = ?", (client_id, name)
            )
        case Kind.RETAIN:
            connection.execute(
                "INSERT OR REPLACE INTO retained (topic, payload, qos) VALUES (?, ?, ?)",
                (name, payload, qos),
            )
        case Kind.UNRETAIN:
            connection.execute("DELETE FROM retained WHERE topic = ?", (name,))
        case _:
            raise BrokerError(f"unknown broker state change {kind!r}")
