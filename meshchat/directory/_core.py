"""The directory's SQLite file: opening and migrating it, transactions and the audit log.

`DirectoryCore` is the base every domain mixin of `meshchat.directory.store.Directory` shares:
one connection, one ``_write()`` transaction that nested calls join, and one ``_audit()`` that
writes the hash-chained audit row inside the change it records.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, Self

from sqlite_utils import Database

from meshchat.directory.audit import (
    GENESIS,
    AuditEntry,
    canonical_details,
    chain_hash,
    verify_chain,
)
from meshchat.directory.schema import MIGRATIONS
from meshchat.errors import ConfigError, DirectoryError

__all__: list[str] = []  # internal: `meshchat.directory.store.Directory` is the public face

DIRECTORY_FILE: Final = "directory.db"
KEY_ACTIONS: Final = frozenset({"org.keys", "user.identity", "owntracks.key"})
"""Audit actions `Directory.audit_keys` may record (key creation, public keys only)."""
SERVICE_ACTIONS: Final = frozenset({"archive.retention"})
"""Audit actions `Directory.audit_service` may record (what meshchat's services did alone)."""


def _rollback(conn: sqlite3.Connection) -> None:
    """Undo the open transaction, if SQLite has not ended it already."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _directory_error(exc: sqlite3.Error, path: Path) -> DirectoryError:
    return DirectoryError(f"directory {path} cannot be used: {exc}")


class DirectoryCore:
    """The directory file, its transactions and its audit log; the base of every domain mixin."""

    def __init__(self, path: Path | str, *, clock: Any = time.time) -> None:  # noqa: ANN401  # any callable returning seconds
        """Open (and create or migrate) the directory at `path`.

        Raises:
            ConfigError: the file cannot be opened or is not a directory database.
        """
        self.path = Path(path)
        self._clock = clock
        try:
            self.db = Database(self.path)
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path} is not a usable directory database: {exc}") from exc
        try:
            self.db.conn.execute("PRAGMA busy_timeout = 10000")
            self.db.conn.execute("PRAGMA foreign_keys = ON")
            self.db.enable_wal()
            MIGRATIONS.apply(self.db)
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise ConfigError(f"{self.path} is not a usable directory database: {exc}") from exc

    @classmethod
    def in_data_dir(cls, data: Path) -> Self:
        """The directory of a data directory."""
        return cls(data / DIRECTORY_FILE)

    def close(self) -> None:
        """Close the database file."""
        self.db.close()

    def __enter__(self) -> Self:
        """Use the directory in a with-block."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the database file."""
        self.close()

    # -- transactions --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One immediate write transaction; nested calls join the outer one."""
        conn = self.db.conn
        if conn.in_transaction:
            yield conn
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _directory_error(exc, self.path) from exc
        try:
            yield conn
        except BaseException:
            _rollback(conn)
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:  # e.g. busy past the timeout: nothing was written
            _rollback(conn)
            raise _directory_error(exc, self.path) from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[None]:
        """A consistent view across several queries (a read transaction)."""
        conn = self.db.conn
        if conn.in_transaction:
            yield
            return
        conn.execute("BEGIN")
        try:
            yield
        finally:
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction around several calls (read, decide, write with no one between).

        Calls inside it join it; it commits at the end of the block, or rolls back on an error.
        """
        with self._write():
            yield

    def data_version(self) -> int:
        """A number that changes whenever another connection commits a change."""
        return int(self.db.conn.execute("PRAGMA data_version").fetchone()[0])

    # -- audit ---------------------------------------------------------------------------------

    def _audit(self, actor: str, action: str, target: str, **details: Any) -> None:  # noqa: ANN401  # JSON values
        conn = self.db.conn
        assert conn.in_transaction, "audit rows are written inside the change they record"
        row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
        ts = float(self._clock())
        text = canonical_details(details)
        digest = chain_hash(
            prev, seq, ts=ts, actor=actor, action=action, target=target, details=text
        )
        conn.execute(
            "INSERT INTO audit (seq, ts, actor, action, target, details, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, ts, actor, action, target, text, prev, digest),
        )
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('audit_head', ?)",
            (json.dumps([seq, digest]),),
        )

    def audit_keys(self, actor: str, action: str, target: str, **public: str) -> None:
        """Record the creation of keys in the audit log: public keys and fingerprints only.

        Args:
            actor: who (or which start of the server) created them.
            action: one of `KEY_ACTIONS`.
            target: the org or the user.
            **public: public keys (hex) and fingerprints; never a secret.
        """
        if action not in KEY_ACTIONS:
            raise ValueError(f"{action!r} is not a key action")
        with self._write():
            self._audit(actor, action, target, **public)

    def audit_service(self, actor: str, action: str, target: str, **details: Any) -> None:  # noqa: ANN401  # JSON values
        """Record what one of meshchat's services did on its own (a retention pass).

        Args:
            actor: the service (``svc.archive``).
            action: one of `SERVICE_ACTIONS`.
            target: what it acted on.
            **details: JSON values describing it; never a secret or a message.
        """
        if action not in SERVICE_ACTIONS:
            raise ValueError(f"{action!r} is not a service action")
        with self._write():
            self._audit(actor, action, target, **details)

    def audit_entries(self, *, last: int | None = None) -> list[AuditEntry]:
        """The audit log in order (only the `last` rows when given)."""
        sql = "SELECT seq, ts, actor, action, target, details, prev_hash, hash FROM audit"
        if last is not None:
            sql = f"SELECT * FROM ({sql} ORDER BY seq DESC LIMIT ?) ORDER BY seq"  # noqa: S608  # constant SQL
            rows = self.db.conn.execute(sql, (last,)).fetchall()
        else:
            rows = self.db.conn.execute(sql + " ORDER BY seq").fetchall()
        return [AuditEntry(*row) for row in rows]

    def verify_audit(self) -> int:
        """Check the whole audit chain; returns the number of rows.

        Raises:
            AuditChainError: naming the first bad row.
        """
        row = self.db.conn.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
        head = tuple(json.loads(row[0])) if row else None
        cursor = self.db.conn.execute(
            "SELECT seq, ts, actor, action, target, details, prev_hash, hash FROM audit "
            "ORDER BY rowid"
        )
        return verify_chain(
            (AuditEntry(*r) for r in cursor),
            (int(head[0]), str(head[1])) if head else None,
        )
