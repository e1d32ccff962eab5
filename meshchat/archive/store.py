"""The archive store: envelopes and their header columns in one SQLite file (``DATA/archive.db``).

Blocking and single-connection: the archiver's writer thread owns one `ArchiveStore`, its
reader thread another (WAL lets them run side by side), and the CLI opens its own. A fresh file
gets ``auto_vacuum=INCREMENTAL`` before its first table, so retention can give pages back to the
file system with ``PRAGMA incremental_vacuum``.

Committed means written to the WAL (``synchronous=NORMAL``), as the broker's state store does: a
commit survives the archiver process dying in any way, ``kill -9`` included; a power cut may
lose the last commits (and the broker, which then never got their acknowledgement, sends them
again only if its own state survived).
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

from sqlite_utils import Database

from meshchat.archive.records import Record, TopicKind
from meshchat.archive.schema import MIGRATIONS
from meshchat.envelope import EnvelopeType
from meshchat.errors import ConfigError

__all__ = [
    "ARCHIVE_FILE",
    "COLUMNS",
    "ArchiveStore",
    "ChainSummary",
    "Cursor",
    "Page",
    "StoredEnvelope",
]

ARCHIVE_FILE: Final = "archive.db"
"""The archive's file name inside the data directory."""
COLUMNS: Final = (
    "topic",
    "kind",
    "group_path",
    "name",
    "etype",
    "chain_id",
    "chain_index",
    "sender",
    "received_at",
    "size",
    "digest",
    "payload",
)
_ROWS_PER_STATEMENT: Final = 500
"""Rows one INSERT statement carries (6,000 parameters, far below SQLite's 32,766)."""


@functools.cache
def _insert_sql(rows: int) -> str:
    """``INSERT OR IGNORE`` of `rows` rows (idempotent: a stored envelope is skipped)."""
    one = f"({', '.join('?' * len(COLUMNS))})"
    return (
        f"INSERT OR IGNORE INTO envelopes ({', '.join(COLUMNS)}) "  # noqa: S608  # constant SQL
        f"VALUES {', '.join([one] * rows)}"
    )


# A damaged row may hold text where bytes belong: read bytes as bytes whatever is stored.
_READ: Final = [
    f"CAST({column} AS BLOB)" if column in {"digest", "payload"} else column for column in COLUMNS
]
_SELECT: Final = f"SELECT id, {', '.join(_READ)} FROM envelopes"  # noqa: S608  # constant SQL
_DELETE_CHUNK: Final = 5000
_BUSY_TIMEOUT_MS: Final = 10_000
_CACHE_KIB: Final = 32 * 1024
_FAR_FUTURE: Final = 1e18

Cursor = tuple[float, int]
"""Where a page ended: (received_at, id) of its last envelope."""


@dataclass(frozen=True, slots=True)
class StoredEnvelope:
    """One archived envelope as stored: its row id, header columns and payload."""

    id: int
    topic: str
    kind: TopicKind
    group_path: str | None
    name: str | None
    etype: EnvelopeType
    chain_id: int | None
    chain_index: int | None
    sender: str | None
    received_at: float
    size: int
    digest: bytes
    payload: bytes

    @property
    def cursor(self) -> Cursor:
        """The cursor of a page that ends with this envelope."""
        return (self.received_at, self.id)


def _stored(row: tuple[Any, ...]) -> StoredEnvelope:
    """An envelope from a ``SELECT id, COLUMNS`` row."""
    (row_id, topic, kind, group_path, name, etype, chain_id, chain_index, sender, *rest) = row
    received_at, size, digest, payload = rest
    return StoredEnvelope(
        id=int(row_id),
        topic=str(topic),
        kind=TopicKind(kind),
        group_path=None if group_path is None else str(group_path),
        name=None if name is None else str(name),
        etype=EnvelopeType(etype),
        chain_id=None if chain_id is None else int(chain_id),
        chain_index=None if chain_index is None else int(chain_index),
        sender=None if sender is None else str(sender),
        received_at=float(received_at),
        size=int(size),
        digest=bytes(digest),
        payload=bytes(payload),
    )


@dataclass(frozen=True, slots=True)
class Page:
    """One page of envelopes and where the next page starts (None: this was the last)."""

    items: list[StoredEnvelope]
    oversize: frozenset[int]
    """Ids of items listed without their payload: alone they exceed the page's byte budget."""
    next: Cursor | None


@dataclass(frozen=True, slots=True)
class ChainSummary:
    """The group messages of one chain in the archive."""

    group_path: str
    chain_id: int
    messages: int
    first_received: float
    last_received: float


class ArchiveStore:
    """The archive file; a context manager that closes it. One thread uses one store."""

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        """Open (and create, or migrate) the archive at `path`.

        Args:
            path: the SQLite file.
            create: create the file when it is missing (else that is an error).

        Raises:
            ConfigError: the file is missing (with `create` False), unusable, or not an archive.
        """
        self.path = Path(path)
        if not create and not self.path.exists():
            raise ConfigError(
                f"no archive at {self.path}: `meshchat archive` or `meshchat up` creates it"
            )
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if fresh:
            # Private from the first byte; SQLite gives its WAL and shm files the same mode.
            try:
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError as exc:
                raise ConfigError(f"cannot create {self.path}: {exc.strerror or exc}") from exc
        try:
            self.db = Database(self.path)
            conn = self.db.conn
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            # Index pages stay in memory: a random (topic, digest) key per insert needs them.
            conn.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
            if fresh:
                # Only takes effect before the first table is created.
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            self.db.enable_wal()
            conn.execute("PRAGMA synchronous = NORMAL")
            MIGRATIONS.apply(self.db)
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path} is not a usable archive: {exc}") from exc

    @property
    def conn(self) -> sqlite3.Connection:
        """The underlying connection."""
        return self.db.conn

    def close(self) -> None:
        """Close the file."""
        self.db.close()

    def __enter__(self) -> Self:
        """Use the store in a with-block."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the file."""
        self.close()

    # -- writing ---------------------------------------------------------------------------

    def insert(self, records: Sequence[Record]) -> int:
        """Store records in one transaction; returns how many were new (the rest were there).

        Rows go in as multi-row ``INSERT`` statements: each statement lets go of the GIL once,
        where ``executemany`` would once per row, and the event loop holds the GIL most of the
        time (in ``meshchat up`` it also runs the broker), so every hand-back costs a wait.

        Raises:
            sqlite3.Error: the transaction failed; nothing of it is stored.
        """
        conn = self.conn
        with conn:
            before = conn.total_changes
            for start in range(0, len(records), _ROWS_PER_STATEMENT):
                chunk = records[start : start + _ROWS_PER_STATEMENT]
                conn.execute(_insert_sql(len(chunk)), [v for r in chunk for v in r.row()])
            return conn.total_changes - before

    def delete_before(
        self, cutoff: float, *, group_path: str | None = None, kind: TopicKind | None = None
    ) -> int:
        """Delete what was received before `cutoff`, of one group or of one kind of topic.

        Deletes in chunks, one transaction each, so no transaction grows large.

        Returns:
            The number of envelopes deleted.
        """
        if (group_path is None) == (kind is None):
            raise ValueError("delete by group_path or by kind, not both")
        if group_path is not None:
            where, arg = "group_path = ? AND received_at < ?", group_path
        else:
            assert kind is not None
            where, arg = "kind = ? AND name IS NOT NULL AND received_at < ?", kind.value
        sql = (
            f"DELETE FROM envelopes WHERE id IN (SELECT id FROM envelopes WHERE {where} "  # noqa: S608  # constant SQL
            f"LIMIT {_DELETE_CHUNK})"
        )
        deleted = 0
        conn = self.conn
        while True:
            with conn:
                count = conn.execute(sql, (arg, cutoff)).rowcount
            deleted += count
            if count < _DELETE_CHUNK:
                return deleted

    def vacuum(self) -> int:
        """Give the free pages back to the file system; returns how many bytes the file shrank."""
        conn = self.conn
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        before = int(conn.execute("PRAGMA page_count").fetchone()[0])
        # Each step of this pragma frees one page and sqlite3's execute() steps once; a script
        # runs it to completion (and there is no open transaction for it to commit).
        conn.executescript("PRAGMA incremental_vacuum")
        # The shortened file is in the WAL until a checkpoint writes it back and truncates.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        after = int(conn.execute("PRAGMA page_count").fetchone()[0])
        return max(0, before - after) * page_size

    # -- reading ---------------------------------------------------------------------------

    def file_size(self) -> int:
        """Bytes of the database file and its WAL."""
        wal = self.path.with_name(self.path.name + "-wal")
        return self.path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)

    def count(
        self,
        *,
        kind: TopicKind | None = None,
        group_path: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> int:
        """How many envelopes are archived (of one kind or one group) received in [since, until).

        Counted from an index: no envelope is read.
        """
        where: list[str] = []
        args: list[object] = []
        if group_path is not None:
            where, args = ["group_path = ?"], [group_path]
        elif kind is not None:
            where, args = ["kind = ? AND name IS NOT NULL"], [kind.value]
        if since is not None or until is not None:
            where.append("received_at >= ? AND received_at < ?")
            args += [since if since is not None else 0.0, until or _FAR_FUTURE]
        sql = "SELECT COUNT(*) FROM envelopes"
        if where:
            sql += f" WHERE {' AND '.join(where)}"
        return int(self.conn.execute(sql, args).fetchone()[0])

    def group_paths(self) -> list[str]:
        """Every group with archived envelopes."""
        rows = self.conn.execute(
            "SELECT DISTINCT group_path FROM envelopes WHERE group_path IS NOT NULL "
            "ORDER BY group_path"
        )
        return [str(row[0]) for row in rows]

    def _page(
        self, sql: str, args: Sequence[object], *, limit: int, budget: int, overhead: int
    ) -> Page:
        """Read rows until `limit` items or `budget` bytes (payloads plus `overhead` each)."""
        items: list[StoredEnvelope] = []
        oversize: set[int] = set()
        used = 0
        more = False
        for row in self.conn.execute(sql, [*args, limit + 1]):
            envelope = _stored(row)
            cost = envelope.size + overhead
            if len(items) == limit or (items and used + cost > budget):
                more = True
                break
            if cost > budget:
                oversize.add(envelope.id)
                cost = overhead
            used += cost
            items.append(envelope)
        return Page(items, frozenset(oversize), items[-1].cursor if more else None)

    def history(
        self,
        group_path: str,
        *,
        since: float | None = None,
        until: float | None = None,
        after: Cursor | None = None,
        newest_first: bool = False,
        limit: int = 500,
        budget: int = 60_000,
        overhead: int = 0,
    ) -> Page:
        """A page of a group's messages received in [since, until), by time.

        Compliance copies are left out (no member can read them).

        Args:
            group_path: ``dept/group``.
            since: the earliest receive time (unix seconds), or None for the beginning.
            until: the receive time to stop before, or None for now.
            after: the cursor of the previous page.
            newest_first: page backwards from `until`.
            limit: items per page at most.
            budget: payload bytes per page at most (one item always fits; an item over the
                budget alone is listed without its payload).
            overhead: bytes each item costs besides its payload.
        """
        low, high = (since if since is not None else 0.0), (until or _FAR_FUTURE)
        order = "DESC" if newest_first else "ASC"
        compare = "<" if newest_first else ">"
        sql = (
            f"{_SELECT} WHERE group_path = ? AND etype = ? AND received_at >= ? AND received_at < ?"
        )
        args: list[object] = [group_path, int(EnvelopeType.GROUP), low, high]
        if after is not None:
            sql += f" AND (received_at, id) {compare} (?, ?)"
            args += [after[0], after[1]]
        sql += f" ORDER BY received_at {order}, id {order} LIMIT ?"
        return self._page(sql, args, limit=limit, budget=budget, overhead=overhead)

    def gap(
        self,
        group_path: str,
        chain_id: int,
        first: int,
        last: int,
        *,
        after: Cursor | None = None,
        limit: int = 500,
        budget: int = 60_000,
        overhead: int = 0,
    ) -> Page:
        """A page of one chain's messages with indices in [first, last], by index.

        The cursor is (index, id) of the last item.
        """
        sql = (
            f"{_SELECT} WHERE group_path = ? AND chain_id = ? AND etype = ? "
            "AND chain_index BETWEEN ? AND ?"
        )
        args: list[object] = [group_path, chain_id, int(EnvelopeType.GROUP), first, last]
        if after is not None:
            sql += " AND (chain_index, id) > (?, ?)"
            args += [int(after[0]), after[1]]
        sql += " ORDER BY chain_index, id LIMIT ?"
        page = self._page(sql, args, limit=limit, budget=budget, overhead=overhead)
        if page.next is None:
            return page
        tail = page.items[-1]
        assert tail.chain_index is not None
        return Page(page.items, page.oversize, (float(tail.chain_index), tail.id))

    def inbox(
        self,
        device: str,
        *,
        since: float | None = None,
        after: Cursor | None = None,
        limit: int = 500,
        budget: int = 60_000,
        overhead: int = 0,
    ) -> Page:
        """A page of what a device's inbox received since `since`, by time."""
        sql = f"{_SELECT} WHERE kind = ? AND name = ? AND received_at >= ?"
        args: list[object] = [TopicKind.INBOX.value, device, since or 0.0]
        if after is not None:
            sql += " AND (received_at, id) > (?, ?)"
            args += [after[0], after[1]]
        sql += " ORDER BY received_at, id LIMIT ?"
        return self._page(sql, args, limit=limit, budget=budget, overhead=overhead)

    def group_envelopes(
        self, group_path: str, *, since: float | None = None, until: float | None = None
    ) -> Iterator[StoredEnvelope]:
        """Every envelope of a group (messages and compliance copies) in [since, until)."""
        rows = self.conn.execute(
            f"{_SELECT} WHERE group_path = ? AND received_at >= ? AND received_at < ? "
            "ORDER BY received_at, id",
            (group_path, since if since is not None else 0.0, until or _FAR_FUTURE),
        )
        for row in rows:
            yield _stored(row)

    def chains_in(
        self, group_path: str, *, since: float | None = None, until: float | None = None
    ) -> list[int]:
        """The chains of a group's messages received in [since, until), by chain id.

        Only header columns are read: no payload is fetched.
        """
        rows = self.conn.execute(
            "SELECT DISTINCT chain_id FROM envelopes WHERE group_path = ? AND etype = ? "
            "AND received_at >= ? AND received_at < ? AND chain_id IS NOT NULL ORDER BY chain_id",
            (
                group_path,
                int(EnvelopeType.GROUP),
                since if since is not None else 0.0,
                until or _FAR_FUTURE,
            ),
        )
        return [int(row[0]) for row in rows]

    def copies_of(self, group_path: str, chain_ids: Sequence[int]) -> Iterator[StoredEnvelope]:
        """The compliance copies archived for some chains of a group, whenever received."""
        wanted = sorted(set(chain_ids))
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            # By chain: left to itself, SQLite walks the group's whole history by time.
            rows = self.conn.execute(
                f"{_SELECT} INDEXED BY envelopes_by_chain WHERE group_path = ? AND etype = ? "
                f"AND chain_id IN ({', '.join('?' * len(chunk))}) ORDER BY received_at, id",
                (group_path, int(EnvelopeType.DIST), *chunk),
            )
            for row in rows:
                yield _stored(row)

    def key_records(self, *, until: float | None = None) -> Iterator[StoredEnvelope]:
        """Every archived key record received before `until`, oldest first."""
        rows = self.conn.execute(
            f"{_SELECT} WHERE kind = ? AND name IS NOT NULL AND received_at < ? "
            "ORDER BY received_at, id",
            (TopicKind.KEY.value, until or _FAR_FUTURE),
        )
        for row in rows:
            yield _stored(row)

    def all_envelopes(
        self, *, batch: int = 1000
    ) -> Iterator[tuple[int, StoredEnvelope | None, str | None]]:
        """Every archived row in id order, read in batches.

        Yields (id, envelope, None), or (id, None, why) for a row too damaged to read.
        """
        last = 0
        while True:
            rows = self.conn.execute(
                f"{_SELECT} WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
            ).fetchall()
            if not rows:
                return
            for row in rows:
                try:
                    yield int(row[0]), _stored(row), None
                except (TypeError, ValueError) as exc:
                    yield int(row[0]), None, f"unreadable: {exc}"
            last = int(rows[-1][0])

    def chains(self, group_path: str) -> list[ChainSummary]:
        """The chains of a group's archived messages."""
        rows = self.conn.execute(
            "SELECT chain_id, COUNT(*), MIN(received_at), MAX(received_at) FROM envelopes "
            "WHERE group_path = ? AND etype = ? GROUP BY chain_id ORDER BY MIN(received_at)",
            (group_path, int(EnvelopeType.GROUP)),
        )
        return [ChainSummary(group_path, int(c), int(n), float(a), float(b)) for c, n, a, b in rows]

    def copied_chains(self, group_path: str) -> set[int]:
        """The chains of a group with an archived compliance copy."""
        rows = self.conn.execute(
            "SELECT DISTINCT chain_id FROM envelopes WHERE group_path = ? AND etype = ?",
            (group_path, int(EnvelopeType.DIST)),
        )
        return {int(row[0]) for row in rows}

    def integrity_problems(self) -> list[str]:
        """What SQLite's own integrity check finds (an empty list when the file is sound)."""
        rows = self.conn.execute("PRAGMA integrity_check").fetchall()
        found = [str(row[0]) for row in rows]
        return [] if found == ["ok"] else found
