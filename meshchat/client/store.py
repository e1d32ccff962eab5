"""The local client store of one device profile: session state, outbox, decrypted messages.

One SQLite file (sqlite-utils, WAL) in the profile's private directory, so that:

- the E2EE session state (chain keys, seen sets) and the outbox change together: a message is
  sealed (encrypted, with the distributions it needs) and the new session state saved in one
  transaction, so a crash either leaves it queued as plaintext, to be sealed again, or sealed,
  to be published again byte for byte (receivers drop the identical redelivery). Nothing the user
  sent is lost and nothing is shown twice;
- decrypted messages are kept with an FTS5 index: search works although the server never sees
  plaintext. Edits and recalls change the stored message in place.

The file holds plaintext and keys: the profile directory is private (0700) and the file 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

import msgpack
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from meshchat.errors import ConfigError

__all__ = ["ClientStore", "OutboxItem", "StoredMessage"]

MIGRATIONS = Migrations("meshchat.client")
_WORD: Final = re.compile(r"\w+", re.UNICODE)
_MAX_SEARCH_WORDS: Final = 16

# Message kinds as stored (the values of meshchat.e2ee.Kind; the store does not import e2ee).
TEXT, REPLY, EDIT, RECALL, REACT, RECEIPT, URGENT, ACK = 0, 1, 2, 3, 4, 5, 8, 9
_META: Final = (EDIT, RECALL, REACT, RECEIPT, ACK)
"""Kinds about another message: folded into it, not listed as messages of their own."""


@MIGRATIONS(name="0001_initial")
def _initial(db: Database) -> None:
    db.table("state").create({"key": str, "value": bytes}, pk="key")
    db.table("outbox").create(
        {
            "id": int,
            "group_topic": str,
            "inner": bytes,
            "created_at": float,
            "sealed": bytes,
            "message_id": str,
        },
        pk="id",
        not_null={"group_topic", "inner", "created_at"},
    )
    db.table("messages").create(
        {
            "group_topic": str,
            "chain_id": int,
            "idx": int,
            "sender": str,
            "device": str,
            "kind": int,
            "ts": int,
            "body": str,
            "fields": bytes,
            "received_at": float,
            "edited_at": int,
            "recalled": int,
        },
        pk=("group_topic", "chain_id", "idx"),
        not_null={"sender", "device", "kind", "ts", "body", "received_at"},
        defaults={"recalled": 0, "body": ""},
    )
    db.table("messages").create_index(["group_topic", "ts"])
    db.table("messages").enable_fts(["body"], tokenize="unicode61", create_triggers=True)
    db.table("notices").create(
        {"group_topic": str, "chain_id": int, "idx": int, "reason": str, "code": str},
        pk=("group_topic", "chain_id", "idx"),
    )


@MIGRATIONS(name="0002_reactions_receipts_acks")
def _reactions(db: Database) -> None:
    key = ["group_topic", "chain_id", "idx", "user"]
    db.table("reactions").create(
        {"group_topic": str, "chain_id": int, "idx": int, "user": str, "emoji": str},
        pk=(*key, "emoji"),
    )
    db.table("receipts").create(
        {"group_topic": str, "chain_id": int, "idx": int, "user": str, "kind": int, "at": int},
        pk=(*key, "kind"),
    )
    db.table("acks").create(
        {"group_topic": str, "chain_id": int, "idx": int, "user": str, "at": int}, pk=key
    )
    db.table("urgent").create(
        {"group_topic": str, "chain_id": int, "idx": int, "expected": str},
        pk=("group_topic", "chain_id", "idx"),
    )


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A message the user sent that has not been acknowledged by the broker yet."""

    id: int
    group_topic: str
    inner: bytes
    created_at: float
    sealed: tuple[tuple[str, bytes], ...] | None
    """Once encrypted: every (topic, payload) to publish for it, in order."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A decrypted message as kept locally."""

    group_topic: str
    message_id: tuple[int, int]
    sender: str
    device: str
    kind: int
    ts: int
    body: str
    fields: bytes
    edited_at: int | None
    recalled: bool


class ClientStore:
    """The SQLite store of one device profile."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        """Open (or create, private) the store at `path`.

        Raises:
            ConfigError: the file cannot be opened or is not a client store.
        """
        self.path = path
        self._clock = clock
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            path.chmod(0o600)
            self.db = Database(sqlite3.connect(path, isolation_level=None))
            self.db.enable_wal()
            MIGRATIONS.apply(self.db)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"client store {path} cannot be used: {exc}") from exc

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def __enter__(self) -> Self:
        """Use as a context manager."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close on exit."""
        self.close()

    def data_version(self) -> int:
        """A number that changes whenever another connection commits to this store."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def pending(self, item_id: int) -> bool:
        """Whether an outbox item still waits for the broker's acknowledgement."""
        return (
            self.db.execute("SELECT 1 FROM outbox WHERE id = ?", (item_id,)).fetchone() is not None
        )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Make the writes inside one transaction: one commit (and one sync) for all of them."""
        with self._write():
            yield

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self.db.conn
        if conn.in_transaction:  # inside `transaction()`: one commit for all of it
            yield conn
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # Also after a failed COMMIT, which leaves the transaction open (then "no
            # transaction is active" is the only way ROLLBACK fails).
            with contextlib.suppress(sqlite3.OperationalError):
                conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------------ key/value state

    def get(self, key: str) -> bytes | None:
        """A stored value (the E2EE session state, profile settings)."""
        row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key: str, value: bytes) -> None:
        """Store a value."""
        self.put_many({key: value})

    def put_many(self, values: Mapping[str, bytes]) -> None:
        """Store several values in one transaction (a new key goes after every other)."""
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO state (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                values.items(),
            )

    def get_prefixed(self, prefix: str) -> dict[str, bytes]:
        """Every stored value whose key starts with `prefix`, by key without the prefix.

        In the order the keys were first stored: a value rewritten since keeps its place.
        """
        rows = self.db.execute(
            "SELECT key, value FROM state WHERE substr(key, 1, ?) = ? ORDER BY rowid",
            (len(prefix), prefix),
        )
        return {str(key)[len(prefix) :]: bytes(value) for key, value in rows}

    def delete_prefixed(self, prefix: str) -> None:
        """Forget every stored value whose key starts with `prefix`."""
        with self._write() as conn:
            conn.execute("DELETE FROM state WHERE substr(key, 1, ?) = ?", (len(prefix), prefix))

    def delete(self, key: str) -> None:
        """Forget a stored value (nothing happens when there is none)."""
        with self._write() as conn:
            conn.execute("DELETE FROM state WHERE key = ?", (key,))

    # ---------------------------------------------------------------------------- outbox

    def enqueue(self, group_topic: str, inner: bytes) -> int:
        """Keep a message the user sent (plaintext, before encryption); returns its outbox id."""
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO outbox (group_topic, inner, created_at) VALUES (?, ?, ?)",
                (group_topic, inner, self._clock()),
            )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def enqueue_sealed(self, topic: str, inner: bytes, outgoing: list[tuple[str, bytes]]) -> int:
        """Keep a message encrypted already (a direct message): queued and sealed at once.

        Args:
            topic: what the outbox row is about (the recipient's inbox topic).
            inner: the plaintext, kept on this machine only.
            outgoing: the (topic, payload) envelopes to publish.

        Returns:
            Its outbox id.
        """
        sealed: bytes = msgpack.packb([list(pair) for pair in outgoing], use_bin_type=True)
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO outbox (group_topic, inner, created_at, sealed) VALUES (?, ?, ?, ?)",
                (topic, inner, self._clock(), sealed),
            )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def outbox(self) -> list[OutboxItem]:
        """Unacknowledged messages, oldest first."""
        rows = self.db.execute(
            "SELECT id, group_topic, inner, created_at, sealed FROM outbox ORDER BY id"
        ).fetchall()
        return [
            OutboxItem(
                row[0],
                row[1],
                bytes(row[2]),
                row[3],
                None if row[4] is None else _unpack_sealed(bytes(row[4])),
            )
            for row in rows
        ]

    @property
    def queued(self) -> int:
        """How many messages wait to go out."""
        return int(self.db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def seal(
        self,
        item_id: int,
        outgoing: list[tuple[str, bytes]],
        *,
        message_id: tuple[int, int],
    ) -> None:
        """Record what a message was encrypted to.

        Call it inside `transaction()` with the session's state, so both or neither are kept.
        """
        sealed: bytes = msgpack.packb([list(pair) for pair in outgoing], use_bin_type=True)
        with self._write() as conn:
            conn.execute(
                "UPDATE outbox SET sealed = ?, message_id = ? WHERE id = ?",
                (sealed, f"{message_id[0]}:{message_id[1]}", item_id),
            )

    def sent(self, item_id: int) -> None:
        """The broker acknowledged everything of an outbox item: forget it."""
        with self._write() as conn:
            conn.execute("DELETE FROM outbox WHERE id = ?", (item_id,))

    # -------------------------------------------------------------------------- messages

    def add_message(
        self,
        group_topic: str,
        message_id: tuple[int, int],
        *,
        sender: str,
        device: str,
        kind: int,
        ts: int,
        body: str,
        fields: bytes,
        target: tuple[int, int] | None = None,
    ) -> bool:
        """Keep a decrypted message; edits and recalls by its sender change the target.

        Returns:
            Whether it was new (False for a message already stored).
        """
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO messages (group_topic, chain_id, idx, sender, device, "
                "kind, ts, body, fields, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    group_topic,
                    message_id[0],
                    message_id[1],
                    sender,
                    device,
                    kind,
                    ts,
                    body if kind not in {EDIT, RECALL} else "",
                    fields,
                    self._clock(),
                ),
            )
            if cursor.rowcount == 0:
                return False
            if target is not None and kind == EDIT:
                conn.execute(
                    "UPDATE messages SET body = ?, edited_at = ? WHERE group_topic = ? AND "
                    "chain_id = ? AND idx = ? AND sender = ? AND recalled = 0",
                    (body, ts, group_topic, target[0], target[1], sender),
                )
            if target is not None and kind == RECALL:
                conn.execute(
                    "UPDATE messages SET body = '', recalled = 1 WHERE group_topic = ? AND "
                    "chain_id = ? AND idx = ? AND sender = ?",
                    (group_topic, target[0], target[1], sender),
                )
            return True

    def message(self, group_topic: str, message_id: tuple[int, int]) -> StoredMessage | None:
        """One stored message."""
        row = self.db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE group_topic = ? AND chain_id = ? AND idx = ?",  # noqa: S608  # fixed columns
            (group_topic, *message_id),
        ).fetchone()
        return None if row is None else _message(row)

    def messages_by_id(
        self, group_topic: str, message_ids: Iterable[tuple[int, int]]
    ) -> dict[tuple[int, int], StoredMessage]:
        """Those of `message_ids` stored here, by id (one query, however many)."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE group_topic = ? AND {_AMONG}",  # noqa: S608  # fixed strings
            (group_topic, _ids(message_ids)),
        ).fetchall()
        return {found.message_id: found for found in map(_message, rows)}

    def add_reaction(
        self, group_topic: str, target: tuple[int, int], *, user: str, emoji: str
    ) -> None:
        """Keep a reaction (once per user and emoji)."""
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO reactions VALUES (?, ?, ?, ?, ?)",
                (group_topic, *target, user, emoji),
            )

    def reactions(self, group_topic: str, target: tuple[int, int]) -> dict[str, list[str]]:
        """Users by emoji."""
        rows = self.db.execute(
            "SELECT emoji, user FROM reactions WHERE group_topic = ? AND chain_id = ? AND idx = ? "
            "ORDER BY emoji, user",
            (group_topic, *target),
        ).fetchall()
        found: dict[str, list[str]] = {}
        for emoji, user in rows:
            found.setdefault(emoji, []).append(user)
        return found

    def reactions_by_id(
        self, group_topic: str, targets: Iterable[tuple[int, int]]
    ) -> dict[tuple[int, int], dict[str, list[str]]]:
        """`reactions` of several messages in one query; those without any are left out."""
        rows = self.db.execute(
            f"SELECT chain_id, idx, emoji, user FROM reactions WHERE group_topic = ? AND {_AMONG} "  # noqa: S608  # fixed strings
            "ORDER BY chain_id, idx, emoji, user",
            (group_topic, _ids(targets)),
        ).fetchall()
        found: dict[tuple[int, int], dict[str, list[str]]] = {}
        for chain_id, idx, emoji, user in rows:
            found.setdefault((chain_id, idx), {}).setdefault(emoji, []).append(user)
        return found

    def add_receipt(
        self, group_topic: str, target: tuple[int, int], *, user: str, kind: int, at: int
    ) -> None:
        """Keep a delivered (0) or read (1) receipt."""
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO receipts VALUES (?, ?, ?, ?, ?, ?)",
                (group_topic, *target, user, kind, at),
            )

    def receipts(self, group_topic: str, target: tuple[int, int], kind: int) -> list[str]:
        """Users who sent a receipt of `kind` for a message."""
        rows = self.db.execute(
            "SELECT user FROM receipts WHERE group_topic = ? AND chain_id = ? AND idx = ? "
            "AND kind = ? ORDER BY user",
            (group_topic, *target, kind),
        ).fetchall()
        return [row[0] for row in rows]

    def add_urgent(
        self, group_topic: str, message_id: tuple[int, int], *, expected: list[str]
    ) -> None:
        """Remember who must acknowledge an urgent notice."""
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO urgent VALUES (?, ?, ?, ?)",
                (group_topic, *message_id, "\n".join(sorted(expected))),
            )

    def add_ack(self, group_topic: str, target: tuple[int, int], *, user: str, at: int) -> bool:
        """Keep an acknowledgement; True when it is the user's first for that notice."""
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO acks VALUES (?, ?, ?, ?, ?)",
                (group_topic, *target, user, at),
            )
            return cursor.rowcount > 0

    def unacknowledged(self, group_topic: str, target: tuple[int, int]) -> list[str] | None:
        """Who has not acknowledged an urgent notice yet (None: not an urgent notice here)."""
        row = self.db.execute(
            "SELECT expected FROM urgent WHERE group_topic = ? AND chain_id = ? AND idx = ?",
            (group_topic, *target),
        ).fetchone()
        if row is None:
            return None
        acked = {
            r[0]
            for r in self.db.execute(
                "SELECT user FROM acks WHERE group_topic = ? AND chain_id = ? AND idx = ?",
                (group_topic, *target),
            ).fetchall()
        }
        return [user for user in str(row[0]).split("\n") if user and user not in acked]

    def unacknowledged_by_id(
        self, group_topic: str, targets: Iterable[tuple[int, int]]
    ) -> dict[tuple[int, int], list[str]]:
        """`unacknowledged` of several messages in one query; those not urgent are left out."""
        sql = (
            "SELECT u.chain_id, u.idx, u.expected, group_concat(a.user, char(10)) "  # noqa: S608  # fixed strings
            "FROM urgent AS u LEFT JOIN acks AS a ON a.group_topic = u.group_topic "
            "AND a.chain_id = u.chain_id AND a.idx = u.idx "
            f"WHERE u.group_topic = ? AND (u.chain_id, u.idx) IN {_IDS} "
            "GROUP BY u.chain_id, u.idx"
        )
        rows = self.db.execute(sql, (group_topic, _ids(targets))).fetchall()
        found: dict[tuple[int, int], list[str]] = {}
        for chain_id, idx, expected, acks in rows:
            acked = set(str(acks or "").split("\n"))
            found[chain_id, idx] = [u for u in str(expected).split("\n") if u and u not in acked]
        return found

    def awaiting_ack(self, group_topic: str, user: str) -> list[tuple[int, int]]:
        """Urgent notices of a group that ask `user` to acknowledge and have no ack of theirs.

        Oldest first; recalled notices and `user`'s own are left out. One query, however long
        the group's history.
        """
        rows = self.db.execute(
            "SELECT u.chain_id, u.idx, u.expected FROM urgent AS u JOIN messages AS m "
            "ON m.group_topic = u.group_topic AND m.chain_id = u.chain_id AND m.idx = u.idx "
            "WHERE u.group_topic = ? AND m.recalled = 0 AND m.sender != ? AND NOT EXISTS "
            "(SELECT 1 FROM acks AS a WHERE a.group_topic = u.group_topic "
            "AND a.chain_id = u.chain_id AND a.idx = u.idx AND a.user = ?) "
            "ORDER BY m.ts, m.rowid",
            (group_topic, user, user),
        ).fetchall()
        return [(row[0], row[1]) for row in rows if user in str(row[2]).split("\n")]

    def has_message(self, group_topic: str, message_id: tuple[int, int]) -> bool:
        """Whether a message is stored."""
        row = self.db.execute(
            "SELECT 1 FROM messages WHERE group_topic = ? AND chain_id = ? AND idx = ?",
            (group_topic, *message_id),
        ).fetchone()
        return row is not None

    def add_notice(
        self, group_topic: str, message_id: tuple[int, int], *, reason: str, code: str
    ) -> None:
        """Keep why a message cannot be read (shown in its place)."""
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO notices (group_topic, chain_id, idx, reason, code) "
                "VALUES (?, ?, ?, ?, ?)",
                (group_topic, *message_id, reason, code),
            )

    def notices(self, group_topic: str) -> list[tuple[tuple[int, int], str, str]]:
        """(message id, reason, code) of the group's unreadable messages."""
        rows = self.db.execute(
            "SELECT chain_id, idx, reason, code FROM notices WHERE group_topic = ? ORDER BY rowid",
            (group_topic,),
        ).fetchall()
        return [((row[0], row[1]), row[2], row[3]) for row in rows]

    def history(
        self,
        group_topic: str | None = None,
        *,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        include_meta: bool = False,
    ) -> list[StoredMessage]:
        """Stored messages, oldest first (the newest `limit` of the range).

        Args:
            group_topic: one group, or all.
            since: only messages sent at or after (unix seconds).
            until: only messages sent before.
            limit: at most this many (the newest ones).
            include_meta: also edits, recalls, reactions, receipts and acknowledgements
                themselves (normally folded into the message they are about).
        """
        where, args = self._range(group_topic, since, until)
        if not include_meta:
            where.append(f"kind NOT IN ({', '.join(map(str, _META))})")
        sql = (
            f"SELECT {_COLUMNS} FROM messages WHERE {' AND '.join(where) or '1'} "  # noqa: S608  # fixed column and clause strings
            "ORDER BY ts DESC, rowid DESC LIMIT ?"
        )
        rows = self.db.execute(sql, (*args, limit)).fetchall()
        return [_message(row) for row in reversed(rows)]

    def search(
        self,
        words: str,
        *,
        group_topic: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 200,
    ) -> list[StoredMessage]:
        """Messages containing every word (prefix match on the last one), newest last.

        Raises:
            ValueError: no word to search for.
        """
        terms = _WORD.findall(words)[:_MAX_SEARCH_WORDS]
        if not terms:
            msg = "give at least one word to search for"
            raise ValueError(msg)
        query = " ".join(f'"{term}"' for term in terms[:-1])
        query = f'{query} "{terms[-1]}"*'.strip()
        where, args = self._range(group_topic, since, until)
        where.append("recalled = 0")
        sql = (
            f"SELECT {_COLUMNS} FROM messages WHERE rowid IN "  # noqa: S608  # fixed strings
            "(SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?) AND "
            f"{' AND '.join(where)} ORDER BY ts DESC, rowid DESC LIMIT ?"
        )
        rows = self.db.execute(sql, (query, *args, limit)).fetchall()
        return [_message(row) for row in reversed(rows)]

    @staticmethod
    def _range(
        group_topic: str | None, since: float | None, until: float | None
    ) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        args: list[Any] = []
        if group_topic is not None:
            where.append("group_topic = ?")
            args.append(group_topic)
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if until is not None:
            where.append("ts < ?")
            args.append(until)
        return where, args


_COLUMNS: Final = (
    "group_topic, chain_id, idx, sender, device, kind, ts, body, fields, edited_at, recalled"
)
_IDS: Final = "(SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))"
"""The message ids of one parameter (`_ids`): any number of them, in one query."""
_AMONG: Final = f"(chain_id, idx) IN {_IDS}"


def _ids(message_ids: Iterable[tuple[int, int]]) -> str:
    """Message ids as the one parameter `_IDS` reads (SQLite limits how many there may be)."""
    return json.dumps([[int(chain_id), int(idx)] for chain_id, idx in message_ids])


def _message(row: tuple[Any, ...]) -> StoredMessage:
    return StoredMessage(
        row[0],
        (row[1], row[2]),
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        bytes(row[8] or b""),
        row[9],
        bool(row[10]),
    )


def _unpack_sealed(data: bytes) -> tuple[tuple[str, bytes], ...]:
    pairs = msgpack.unpackb(data, raw=False)
    return tuple((str(topic), bytes(payload)) for topic, payload in pairs)
