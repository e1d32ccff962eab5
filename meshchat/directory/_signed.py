"""What the directory last signed: each group's roster and each user's key record.

These are public documents (no secrets), kept so that epochs and versions never go back.
`SignedStateMixin` is one of the domain mixins that make up `meshchat.directory.store.Directory`.
"""

from __future__ import annotations

from meshchat.directory._core import DirectoryCore
from meshchat.directory._groups import parse_group_path
from meshchat.directory.model import KeyRecordState, RosterState
from meshchat.errors import DirectoryError

__all__: list[str] = []  # internal: `meshchat.directory.store.Directory` is the public face


class SignedStateMixin(DirectoryCore):
    """The roster and key-record states of `Directory` that `meshchat.directory.signing` keeps."""

    def roster_state(self, path: str) -> RosterState | None:
        """The roster last signed for a group, or None before the first one."""
        dept, name = parse_group_path(path)
        row = self.db.conn.execute(
            "SELECT epoch, hash, issued_at, expires_at, payload FROM rosters "
            "WHERE dept = ? AND name = ?",
            (dept, name),
        ).fetchone()
        if row is None:
            return None
        epoch, digest, issued_at, expires_at, payload = row
        return RosterState(path, epoch, bytes.fromhex(digest), issued_at, expires_at, payload)

    def save_roster_state(self, state: RosterState) -> None:
        """Keep the roster just signed for a group (its epoch never goes back)."""
        dept, name = parse_group_path(state.path)
        with self._write():
            before = self.roster_state(state.path)
            if before is not None and state.epoch <= before.epoch:
                raise DirectoryError(
                    f"roster epoch {state.epoch} of {state.path} is not after {before.epoch}"
                )
            self.db.conn.execute(
                "INSERT OR REPLACE INTO rosters "
                "(dept, name, epoch, hash, issued_at, expires_at, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    dept,
                    name,
                    state.epoch,
                    state.hash.hex(),
                    state.issued_at,
                    state.expires_at,
                    state.payload,
                ),
            )

    def key_record_state(self, user: str) -> KeyRecordState | None:
        """The key record last signed for a user, or None before the first one."""
        row = self.db.conn.execute(
            "SELECT version, payload FROM key_records WHERE user = ?", (user,)
        ).fetchone()
        return None if row is None else KeyRecordState(user, row[0], row[1])

    def save_key_record_state(self, state: KeyRecordState) -> None:
        """Keep the key record just signed for a user (its version never goes back)."""
        with self._write():
            before = self.key_record_state(state.user)
            if before is not None and state.version <= before.version:
                raise DirectoryError(
                    f"key record version {state.version} of {state.user} is not after "
                    f"{before.version}"
                )
            self.db.conn.execute(
                "INSERT OR REPLACE INTO key_records (user, version, payload) VALUES (?, ?, ?)",
                (state.user, state.version, state.payload),
            )
