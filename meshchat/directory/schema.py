"""The directory's SQLite schema, as sqlite-utils migrations (append new ones, never edit)."""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

__all__ = ["MIGRATIONS"]

MIGRATIONS = Migrations("meshchat.directory")


@MIGRATIONS(name="0001_initial")
def _initial(db: Database) -> None:
    db.table("meta").create({"key": str, "value": str}, pk="key")
    db.table("org").create({"name": str, "created_at": float}, pk="name")
    db.table("departments").create({"name": str, "created_at": float}, pk="name")
    db.table("users").create(
        {
            "name": str,
            "dept": str,
            "role": str,
            "status": str,
            "display_name": str,
            "password_hash": str,
            "created_at": float,
            "updated_at": float,
        },
        pk="name",
        not_null={"dept", "role", "status", "created_at", "updated_at"},
        foreign_keys=[("dept", "departments", "name")],
    )
    db.table("devices").create(
        {
            "name": str,
            "owner": str,
            "kind": str,
            "status": str,
            "token_hash": str,
            "created_at": float,
        },
        pk="name",
        not_null={"owner", "kind", "status", "created_at"},
        foreign_keys=[("owner", "users", "name")],
    )
    db.table("groups").create(
        {
            "id": int,
            "dept": str,
            "name": str,
            "kind": str,
            "created_at": float,
            "created_by": str,
            "expires_at": float,
            "announcement": int,
            "post_roles": str,
            "retention_days": int,
            "legal_hold": int,
            "compliance": int,
            "rotation_pending": int,
        },
        pk="id",
        not_null={"dept", "name", "kind", "created_at", "created_by"},
        defaults={
            "announcement": 0,
            "post_roles": "",
            "legal_hold": 0,
            "compliance": 0,
            "rotation_pending": 0,
        },
    )
    db.table("groups").create_index(["dept", "name"], unique=True)
    db.table("members").create(
        {"group_id": int, "user": str, "added_at": float},
        pk=("group_id", "user"),
        foreign_keys=[("group_id", "groups", "id"), ("user", "users", "name")],
    )
    db.table("members").create_index(["user"])
    db.table("sites").create(
        {
            "name": str,
            "lat": float,
            "lon": float,
            "radius_m": float,
            "polygon": str,
            "created_at": float,
        },
        pk="name",
    )
    db.table("audit").create(
        {
            "seq": int,
            "ts": float,
            "actor": str,
            "action": str,
            "target": str,
            "details": str,
            "prev_hash": str,
            "hash": str,
        },
        pk="seq",
        not_null={"ts", "actor", "action", "target", "details", "prev_hash", "hash"},
    )


@MIGRATIONS(name="0002_broker_hashes")
def _broker_hashes(db: Database) -> None:
    """Mosquitto-format hashes beside argon2id, for `meshchat deploy mosquitto`."""
    db.table("users").add_column("broker_hash", str)
    db.table("devices").add_column("broker_hash", str)


@MIGRATIONS(name="0003_e2ee_keys")
def _e2ee_keys(db: Database) -> None:
    """Public device keys, group policy versions, and what the directory last signed.

    Only public keys and signed public documents live here; secrets stay in ``DATA/keys``.
    """
    db.table("devices").add_column("signing_public", bytes)
    db.table("devices").add_column("box_public", bytes)
    db.table("groups").add_column("policy_version", int, not_null_default=0)
    db.table("rosters").create(
        {
            "dept": str,
            "name": str,
            "epoch": int,
            "hash": str,
            "issued_at": int,
            "expires_at": int,
            "payload": bytes,
        },
        pk=("dept", "name"),
        not_null={"epoch", "hash", "issued_at", "expires_at", "payload"},
    )
    db.table("key_records").create(
        {"user": str, "version": int, "payload": bytes},
        pk="user",
        not_null={"version", "payload"},
        foreign_keys=[("user", "users", "name")],
    )


@MIGRATIONS(name="0004_geofence_sites")
def _geofence_sites(db: Database) -> None:
    """Per-site geofence timing, and which site-channel memberships the geofence made.

    ``members.via`` is NULL for memberships an admin made and ``geofence`` for those the
    geofence worker made: it only ever removes its own. NULL timing means the defaults.
    """
    db.table("sites").add_column("dwell_s", float)
    db.table("sites").add_column("exit_dwell_s", float)
    db.table("sites").add_column("hysteresis_m", float)
    db.table("members").add_column("via", str)
