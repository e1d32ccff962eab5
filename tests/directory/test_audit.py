"""The audit log: every admin action is chained; any edit, deletion or reorder is found."""

from __future__ import annotations

import sqlite3

import pytest

from meshchat.directory import Directory
from meshchat.errors import AuditChainError


def _tamper(directory: Directory, sql: str, *args: object) -> None:
    """Change the file behind the directory's back, as someone with file access could."""
    with sqlite3.connect(directory.path) as conn:
        conn.execute(sql, args)


def test_admin_actions_are_recorded(directory: Directory) -> None:
    directory.create_group("bob", "ops/line1")
    directory.add_members("bob", "ops/line1", ["carol"])
    directory.remove_user("root", "carol")
    actions = [(e.actor, e.action, e.target) for e in directory.audit_entries(last=3)]
    assert actions == [
        ("bob", "group.create", "ops/line1"),
        ("bob", "group.add", "ops/line1"),
        ("root", "user.remove", "carol"),
    ]
    assert directory.audit_entries()[-1].details_dict == {"groups": ["ops/line1"]}
    assert directory.verify_audit() == len(directory.audit_entries())


def test_denied_action_is_not_recorded(directory: Directory) -> None:
    count = len(directory.audit_entries())
    with pytest.raises(PermissionError):
        directory.create_group("carol", "ops/x")
    assert len(directory.audit_entries()) == count


@pytest.mark.parametrize(
    ("sql", "first_bad", "words"),
    [
        ("UPDATE audit SET actor = 'mallory' WHERE seq = 4", 4, "edited"),
        ("UPDATE audit SET details = '{}' WHERE seq = 5", 5, "edited"),
        ("DELETE FROM audit WHERE seq = 3", 3, "missing"),
        ("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)", 8, "deleted"),
        ("UPDATE audit SET seq = seq + 100 WHERE seq = 2", 2, "missing"),
    ],
)
def test_tampering_is_detected_and_the_first_bad_row_named(
    directory: Directory, sql: str, first_bad: int, words: str
) -> None:
    assert directory.verify_audit() == 8
    _tamper(directory, sql)
    with pytest.raises(AuditChainError, match=words) as caught:
        directory.verify_audit()
    assert caught.value.seq == first_bad


def test_swapping_two_rows_is_detected(directory: Directory) -> None:
    with sqlite3.connect(directory.path) as conn:
        rows = conn.execute("SELECT * FROM audit WHERE seq IN (4, 5) ORDER BY seq").fetchall()
        conn.execute("DELETE FROM audit WHERE seq IN (4, 5)")
        for row, seq in ((rows[1], 4), (rows[0], 5)):
            conn.execute("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (seq, *row[1:]))
    with pytest.raises(AuditChainError) as caught:
        directory.verify_audit()
    assert caught.value.seq == 4
