"""Retention per group: expired rows go, held groups stay whole, each pass is audited, and the
file gets smaller; the compliance report finds chains an auditor could never read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshchat.archive import (
    DAY,
    ArchiveStore,
    compliance_report,
    compliance_since,
    policies_of,
    record_run,
    run_retention,
)
from meshchat.directory import Directory
from tests.archive.helpers import LINE1, LINE2, copy, make_directory, message, record, sealed

NOW = 1_800_000_000.0


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Directory]:
    with make_directory(tmp_path / "directory.db") as opened:
        yield opened


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ArchiveStore]:
    with ArchiveStore(tmp_path / "archive.db") as opened:
        yield opened


def _fill(store: ArchiveStore, topic: str, chain: int, ages_days: list[float]) -> None:
    store.insert(
        [
            record(topic, message(chain, index, body_len=2000), NOW - age * DAY)
            for index, age in enumerate(ages_days)
        ]
    )


def test_expired_envelopes_go_held_and_unlimited_groups_stay_and_the_run_is_audited(
    store: ArchiveStore, directory: Directory
) -> None:
    directory.set_policy("root", "ops/line1", retention_days=30)
    directory.set_policy("root", "ops/line2", retention_days=30, legal_hold=True)
    ages = [1, 10, 29.9, 30.1, 100, 400]
    _fill(store, LINE1, 1, ages)
    _fill(store, LINE2, 2, ages)
    _fill(store, "mc/acme/ops/gone", 3, ages)  # a group the directory no longer knows
    store.insert([record("mc/acme/_d/b1", sealed(), NOW - age * DAY) for age in (1, 45)])
    report = run_retention(store, policies_of(directory.groups()), now=NOW, inbox_retention_days=30)
    record_run(directory, report)
    assert report.deleted == {"ops/line1": 3}
    assert (report.held, report.unknown, report.inbox_deleted) == (["ops/line2"], ["ops/gone"], 1)
    assert [e.chain_index for e in store.group_envelopes("ops/line1")] == [2, 1, 0]
    assert store.count(group_path="ops/line2") == len(ages)  # legal hold: not one row touched
    assert store.count(group_path="ops/gone") == len(ages)
    entry = directory.audit_entries(last=1)[0]
    assert (entry.actor, entry.action) == ("svc.archive", "archive.retention")
    assert entry.details_dict["deleted"] == {"ops/line1": 3}
    assert entry.details_dict["held"] == ["ops/line2"]
    assert directory.verify_audit() > 0


def test_a_policy_change_applies_from_the_next_pass_on(
    store: ArchiveStore, directory: Directory
) -> None:
    _fill(store, LINE1, 1, [5, 50, 500])
    first = run_retention(
        store, policies_of(directory.groups()), now=NOW, inbox_retention_days=None
    )
    assert first.kept == ["ops/line1"]  # no retention set: everything stays
    directory.set_policy("root", "ops/line1", retention_days=60)
    second = run_retention(
        store, policies_of(directory.groups()), now=NOW, inbox_retention_days=None
    )
    assert second.deleted == {"ops/line1": 1}
    directory.set_policy("root", "ops/line1", legal_hold=True, retention_days=1)
    held = run_retention(store, policies_of(directory.groups()), now=NOW, inbox_retention_days=None)
    assert (held.held, store.count()) == (["ops/line1"], 2)
    directory.set_policy("root", "ops/line1", legal_hold=False)
    released = run_retention(
        store, policies_of(directory.groups()), now=NOW, inbox_retention_days=None
    )
    assert (released.deleted, store.count()) == ({"ops/line1": 2}, 0)


def test_deleting_makes_the_file_smaller(store: ArchiveStore, directory: Directory) -> None:
    directory.set_policy("root", "ops/line1", retention_days=1)
    _fill(store, LINE1, 1, [2.0] * 2000)  # about 4 MB, all expired
    _fill(store, LINE2, 2, [2.0] * 50)
    store.vacuum()
    before = store.path.stat().st_size
    report = run_retention(
        store, policies_of(directory.groups()), now=NOW, inbox_retention_days=None
    )
    after = store.path.stat().st_size
    assert report.deleted == {"ops/line1": 2000}
    assert after < before / 5
    assert report.freed_bytes >= (before - after) * 0.9
    assert store.count() == 50


def test_the_compliance_report_lists_chains_without_a_copy_since_compliance_was_on(
    store: ArchiveStore, directory: Directory
) -> None:
    # line1 asks for compliance copies from now on; line2 never did.
    entries_before = len(directory.audit_entries())
    directory.set_policy("root", "ops/line1", compliance=True)
    turned_on = directory.audit_entries()[entries_before].ts
    store.insert(
        [
            record(LINE1, message(1, 0), turned_on - DAY),  # ended before: no breach
            record(LINE1, copy("ops/line1", 2), turned_on + 1),
            record(LINE1, message(2, 0), turned_on + 2),  # with its copy
            record(LINE1, message(4, 0), turned_on + 3),  # no copy
            record(LINE1, message(4, 1), turned_on + 4),
            record(LINE2, message(5, 0), turned_on + 5),  # no compliance asked
        ]
    )
    since = compliance_since(directory.groups(), directory.audit_entries())
    assert since == {"ops/line1": turned_on}
    report = compliance_report(store, since)
    assert not report.ok
    assert report.checked == 2
    assert [(c.group_path, c.chain_id, c.messages) for c in report.missing] == [("ops/line1", 4, 2)]
    store.insert([record(LINE1, copy("ops/line1", 4), turned_on + 6)])
    assert compliance_report(store, since).ok
