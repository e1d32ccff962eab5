"""The archive's SQLite schema, as sqlite-utils migrations (append new ones, never edit).

One table, ``envelopes``: every archived envelope with its header columns and its payload bytes
exactly as they arrived (ciphertext; the archive never holds a key). A redelivered envelope is
the same bytes on the same topic, so ``(topic, digest)`` is unique and a second insert of it is
ignored. Two envelopes that claim one (chain, index) are both kept: only a reader holding the
chain key can tell the genuine one (a member could otherwise plant a forgery first and have the
real message dropped).
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

__all__ = ["MIGRATIONS"]

MIGRATIONS = Migrations("meshchat.archive")


@MIGRATIONS(name="0001_envelopes")
def _envelopes(db: Database) -> None:
    db.table("envelopes").create(
        {
            "id": int,
            "topic": str,
            "kind": str,  # "group", "key" or "inbox" (`meshchat.archive.records.TopicKind`)
            "group_path": str,  # dept/group, for group topics
            "name": str,  # the user of a key record, the device of an inbox
            "etype": int,  # `meshchat.envelope.EnvelopeType`
            "chain_id": int,  # group messages and chain distributions
            "chain_index": int,
            "sender": str,  # the sending device a distribution or sealed payload names
            "received_at": float,
            "size": int,
            "digest": bytes,  # SHA-256 of the payload
            "payload": bytes,
        },
        pk="id",
        not_null={"topic", "kind", "etype", "received_at", "size", "digest", "payload"},
    )
    conn = db.conn
    conn.execute("CREATE UNIQUE INDEX envelopes_once ON envelopes (topic, digest)")
    # History pages by time, retention by age: both per group.
    conn.execute("CREATE INDEX envelopes_by_group ON envelopes (group_path, received_at)")
    conn.execute("CREATE INDEX envelopes_by_chain ON envelopes (group_path, chain_id, chain_index)")
    # Inbox history, key records, and retention of inboxes. Partial: group messages, nearly
    # every row, have no name and cost this index nothing (every index costs ingest speed).
    conn.execute(
        "CREATE INDEX envelopes_by_name ON envelopes (kind, name, received_at) "
        "WHERE name IS NOT NULL"
    )
