"""The directory store: onboarding, groups, membership, offboarding, sites, persistence."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from pathlib import Path

import pytest
from sqlite_utils import Database

from meshchat.directory import MIGRATIONS, Directory, GroupKind, Role, UserStatus
from meshchat.errors import (
    AlreadyExistsError,
    AuthenticationError,
    ConfigError,
    DirectoryError,
    NotFoundError,
    PermissionDeniedError,
    TopicError,
)
from tests.directory.conftest import ADMIN_PASSWORD


def test_org_init_creates_admin_and_refuses_a_second_org(directory: Directory) -> None:
    assert directory.org == "acme"
    admin = directory.user("root")
    assert admin.role is Role.ADMIN
    assert admin.has_password
    with pytest.raises(AlreadyExistsError, match="already holds the org 'acme'"):
        directory.init_org("other", admin="x", password="another password")


def test_passwords_are_stored_only_as_hashes(directory: Directory) -> None:
    stored, broker = directory.db.conn.execute(
        "SELECT password_hash, broker_hash FROM users WHERE name='root'"
    ).fetchone()
    assert stored.startswith("$argon2id$")
    assert broker.startswith("$7$210000$")  # Mosquitto's PBKDF2-SHA512 format
    assert ADMIN_PASSWORD not in stored + broker
    raw = directory.path.read_bytes()
    assert ADMIN_PASSWORD.encode() not in raw


def test_authentication(directory: Directory) -> None:
    assert directory.authenticate_password("root", ADMIN_PASSWORD).name == "root"
    for name, password in [("root", "wrong password"), ("nobody", ADMIN_PASSWORD), ("bob", "")]:
        with pytest.raises(AuthenticationError, match="wrong user name or password"):
            directory.authenticate_password(name, password)


def test_short_password_is_refused(directory: Directory) -> None:
    with pytest.raises(ValueError, match="8 to 1024 characters"):
        directory.set_password("root", "bob", "short")


def test_manager_creates_groups_in_own_department_only(directory: Directory) -> None:
    group = directory.create_group("bob", "ops/line1")
    assert group.members == {"bob"}
    assert group.kind is GroupKind.PUBLIC
    with pytest.raises(PermissionDeniedError) as caught:
        directory.create_group("bob", "finance/budget")
    assert caught.value.permission == "group.create"
    assert "group.create for department finance" in str(caught.value)


def test_member_cannot_create_groups(directory: Directory) -> None:
    with pytest.raises(PermissionDeniedError, match=r"group\.create .* \(carol is member\)"):
        directory.create_group("carol", "ops/mine")


def test_group_names_and_kinds_are_checked(directory: Directory) -> None:
    with pytest.raises(TopicError, match="DEPT/GROUP"):
        directory.create_group("root", "line1")
    with pytest.raises(TopicError, match="upper-case"):
        directory.create_group("root", "ops/Line1")
    with pytest.raises(DirectoryError, match="site add"):
        directory.create_group("root", "sites/plant")
    with pytest.raises(DirectoryError, match="needs an expiry"):
        directory.create_group("root", "ops/tmp", kind=GroupKind.TEMPORARY)
    with pytest.raises(NotFoundError, match="no department 'legal'"):
        directory.create_group("root", "legal/cases")
    directory.create_group("root", "ops/line1")
    with pytest.raises(AlreadyExistsError):
        directory.create_group("root", "ops/line1")


def test_membership_changes_and_rotation_mark(directory: Directory) -> None:
    directory.create_group("bob", "ops/line1")
    assert directory.add_members("bob", "ops/line1", ["carol", "bob"]) == ["carol"]
    assert not directory.group("ops/line1").rotation_pending  # adds do not rotate
    assert directory.remove_members("bob", "ops/line1", ["carol", "dave"]) == ["carol"]
    group = directory.group("ops/line1")
    assert group.members == {"bob"}
    assert group.rotation_pending
    with pytest.raises(PermissionDeniedError, match=r"group\.manage"):
        directory.add_members("carol", "ops/line1", ["carol"])


def test_offboarding_revokes_and_marks_every_group(directory: Directory) -> None:
    directory.set_password("root", "carol", "carols password")
    directory.create_group("root", "ops/line1")
    directory.create_group("root", "ops/line2")
    directory.add_members("root", "ops/line1", ["carol"])
    directory.add_members("root", "ops/line2", ["carol"])
    assert directory.remove_user("root", "carol") == ["ops/line1", "ops/line2"]
    carol = directory.user("carol")
    assert not carol.active
    assert not carol.has_password
    for path in ("ops/line1", "ops/line2"):
        group = directory.group(path)
        assert "carol" not in group.members
        assert group.rotation_pending
    with pytest.raises(AuthenticationError):
        directory.authenticate_password("carol", "carols password")
    assert [u.name for u in directory.users()] == ["bob", "dave", "root"]
    assert "carol" in [u.name for u in directory.users(include_revoked=True)]
    with pytest.raises(AlreadyExistsError, match="revoked account"):
        directory.add_user("root", "carol", dept="ops")
    with pytest.raises(DirectoryError, match="revoked"):
        directory.add_members("root", "ops/line1", ["carol"])


def test_role_and_department_changes(directory: Directory) -> None:
    assert directory.set_role("root", "carol", Role.MANAGER).role is Role.MANAGER
    assert directory.move_user("root", "dave", "ops").dept == "ops"
    with pytest.raises(PermissionDeniedError, match=r"role\.manage"):
        directory.set_role("bob", "carol", Role.ADMIN)
    with pytest.raises(TopicError, match="reserved"):
        directory.move_user("root", "dave", "sites")


def test_sites_get_a_channel(directory: Directory) -> None:
    site = directory.add_site("root", "plant-3", lat=48.1, lon=11.5, radius_m=250)
    assert site.radius_m == 250
    channel = directory.group("sites/plant-3")
    assert channel.dept == "sites"
    square = [(48.0, 11.0), (48.0, 11.1), (48.1, 11.1), (48.1, 11.0)]
    assert directory.add_site("root", "yard", polygon=square).polygon == tuple(square)
    assert [s.name for s in directory.sites()] == ["plant-3", "yard"]
    with pytest.raises(PermissionDeniedError, match=r"site\.manage"):
        directory.add_site("bob", "depot", lat=1, lon=1, radius_m=10)
    with pytest.raises(DirectoryError, match=r"circle .* or a polygon"):
        directory.add_site("root", "both", lat=1, lon=1, radius_m=5, polygon=square)
    with pytest.raises(DirectoryError, match="out of range"):
        directory.add_site("root", "far", lat=91, lon=1, radius_m=5)
    with pytest.raises(AlreadyExistsError):
        directory.add_site("root", "yard", lat=1, lon=1, radius_m=5)


def test_changes_survive_reopening_and_bump_data_version(directory: Directory) -> None:
    with Directory(directory.path) as other:
        before = other.data_version()
        directory.create_group("root", "ops/line1")
        assert other.data_version() != before
        assert other.group("ops/line1").members == {"root"}


def test_failed_change_writes_nothing(directory: Directory) -> None:
    audit_rows = len(directory.audit_entries())
    with pytest.raises(NotFoundError):
        directory.add_members("root", "ops/nope", ["carol"])
    directory.create_group("root", "ops/line1")
    with pytest.raises(NotFoundError):
        directory.add_members("root", "ops/line1", ["carol", "nobody"])
    assert directory.group("ops/line1").members == {"root"}
    assert len(directory.audit_entries()) == audit_rows + 1


def test_revoking_a_revoked_device_again_changes_and_audits_nothing(directory: Directory) -> None:
    directory.add_device("carol", "carol-phone", owner="carol")
    directory.revoke_device("carol", "carol-phone")
    audit_rows = len(directory.audit_entries())
    directory.revoke_device("root", "carol-phone")
    assert len(directory.audit_entries()) == audit_rows
    assert [d.status for d in directory.devices() if d.name == "carol-phone"] == [
        UserStatus.REVOKED
    ]


def test_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    bogus = tmp_path / "directory.db"
    bogus.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="not a usable directory database"):
        Directory(bogus)


def test_schema_is_migrated_once(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    Directory(path).close()
    Directory(path).close()
    with sqlite3.connect(path) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations")]
    assert names == [
        "0001_initial",
        "0002_broker_hashes",
        "0003_e2ee_keys",
        "0004_geofence_sites",
    ]


def test_a_directory_from_before_e2ee_keys_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    old = Database(path)
    MIGRATIONS.apply(old, stop_before="0003_e2ee_keys")
    old.close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO org (name, created_at) VALUES ('acme', 1)")
        conn.execute("INSERT INTO departments (name, created_at) VALUES ('ops', 1)")
        conn.execute(
            "INSERT INTO users (name, dept, role, status, created_at, updated_at) "
            "VALUES ('bob', 'ops', 'manager', 'active', 1, 1)"
        )
        conn.execute(
            "INSERT INTO devices (name, owner, kind, status, created_at) "
            "VALUES ('bob-phone', 'bob', 'phone', 'active', 1)"
        )
        conn.execute(
            "INSERT INTO groups (dept, name, kind, created_at, created_by) "
            "VALUES ('ops', 'line1', 'public', 1, 'bob')"
        )
    conn.close()
    with Directory(path) as directory:
        assert directory.group("ops/line1").policy_version == 0
        assert not directory.devices(owner="bob")[0].has_keys
        assert directory.roster_state("ops/line1") is None
        device = directory.set_device_keys("bob-phone", b"s" * 32, b"b" * 32, actor="bob")
        assert device.has_keys


def test_broker_credentials_verify_with_mosquittos_algorithm(directory: Directory) -> None:
    directory.set_password("root", "carol", "carols password")
    directory.add_user("root", "van-7", dept="ops", role=Role.DEVICE)
    token = directory.add_device("root", "van-7", owner="van-7", kind="vehicle")
    directory.add_device("carol", "carol-phone", owner="carol")
    credentials = directory.broker_credentials()
    assert set(credentials) == {"root", "carol", "van-7"}  # no password, no entry; no phones
    for name, secret in (("carol", "carols password"), ("van-7", token)):
        _, algorithm, rounds, salt, digest = credentials[name].split("$")
        assert algorithm == "7"
        expected = hashlib.pbkdf2_hmac(
            "sha512", secret.encode(), base64.b64decode(salt), int(rounds)
        )
        assert base64.b64decode(digest) == expected
    directory.remove_user("root", "carol")
    assert "carol" not in directory.broker_credentials()


def test_users_named_reads_only_those_accounts_and_leaves_out_the_revoked(
    directory: Directory,
) -> None:
    directory.remove_user("root", "dave")
    assert [u.name for u in directory.users_named(["carol", "dave", "nobody", "bob"])] == [
        "bob",
        "carol",
    ]
    everyone = directory.users_named(["carol", "dave"], include_revoked=True)
    assert [(u.name, u.status.value) for u in everyone] == [
        ("carol", "active"),
        ("dave", "revoked"),
    ]
    assert directory.users_named([]) == []
