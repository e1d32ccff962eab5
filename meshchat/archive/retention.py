"""Retention per group policy: delete what has expired, never what is under legal hold.

A pass reads the groups' current policies (so a change applies from the next pass on), deletes,
per group, the envelopes received longer ago than its ``retention_days`` (a group without a
retention keeps everything; a group under legal hold is not touched at all; a group the
directory does not know is left alone), deletes inbox history older than the inbox retention,
and gives the freed pages back to the file system (``PRAGMA incremental_vacuum``), so the file
shrinks. Key records are kept: an auditor needs them to verify old senders. Each pass is
recorded in the directory's audit log (`record_run`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from meshchat.archive.records import TopicKind
from meshchat.archive.store import ArchiveStore
from meshchat.directory.model import Group
from meshchat.directory.store import Directory
from meshchat.timeutil import DAY

__all__ = [
    "ARCHIVE_ACTOR",
    "DAY",
    "RETENTION_ACTION",
    "GroupPolicy",
    "RetentionReport",
    "policies_of",
    "record_run",
    "run_retention",
]

ARCHIVE_ACTOR: Final = "svc.archive"
"""Who the audit log names for the archiver's own actions."""
RETENTION_ACTION: Final = "archive.retention"


@dataclass(frozen=True, slots=True)
class GroupPolicy:
    """What retention needs of a group's policy."""

    path: str
    retention_days: int | None
    legal_hold: bool


def policies_of(groups: Iterable[Group]) -> list[GroupPolicy]:
    """The retention policies of the directory's groups."""
    return [GroupPolicy(g.path, g.retention_days, g.legal_hold) for g in groups]


@dataclass(frozen=True, slots=True)
class RetentionReport:
    """What one retention pass did.

    Attributes:
        ran_at: when the pass ran (unix seconds); cutoffs count back from it.
        deleted: envelopes deleted per group path.
        inbox_deleted: inbox envelopes deleted.
        held: groups under legal hold: not touched.
        kept: groups without a retention: everything kept.
        unknown: archived groups the directory does not know: not touched.
        freed_bytes: how much smaller the file got.
    """

    ran_at: float
    deleted: dict[str, int] = field(default_factory=dict)
    inbox_deleted: int = 0
    held: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    freed_bytes: int = 0

    @property
    def total_deleted(self) -> int:
        """Envelopes deleted in all."""
        return sum(self.deleted.values()) + self.inbox_deleted

    def as_dict(self) -> dict[str, object]:
        """The report as JSON-able values (for the audit log and ``--json``)."""
        return {
            "ran_at": self.ran_at,
            "deleted": dict(sorted(self.deleted.items())),
            "inbox_deleted": self.inbox_deleted,
            "total_deleted": self.total_deleted,
            "held": sorted(self.held),
            "kept": sorted(self.kept),
            "unknown": sorted(self.unknown),
            "freed_bytes": self.freed_bytes,
        }


def run_retention(
    store: ArchiveStore,
    policies: Iterable[GroupPolicy],
    *,
    now: float,
    inbox_retention_days: int | None,
) -> RetentionReport:
    """One retention pass over the archive (blocking; run it on the writer's thread).

    Args:
        store: the archive (its write connection).
        policies: the current policy of every group the directory knows.
        now: the time the cutoffs count back from (unix seconds).
        inbox_retention_days: days inbox history is kept; None keeps it forever.
    """
    by_path = {policy.path: policy for policy in policies}
    deleted: dict[str, int] = {}
    held: list[str] = []
    kept: list[str] = []
    unknown: list[str] = []
    for path in store.group_paths():
        policy = by_path.get(path)
        if policy is None:
            unknown.append(path)
        elif policy.legal_hold:
            held.append(path)
        elif policy.retention_days is None:
            kept.append(path)
        else:
            cutoff = now - policy.retention_days * DAY
            deleted[path] = store.delete_before(cutoff, group_path=path)
    inbox_deleted = 0
    if inbox_retention_days is not None:
        cutoff = now - inbox_retention_days * DAY
        inbox_deleted = store.delete_before(cutoff, kind=TopicKind.INBOX)
    freed = store.vacuum()
    return RetentionReport(
        ran_at=now,
        deleted=deleted,
        inbox_deleted=inbox_deleted,
        held=held,
        kept=kept,
        unknown=unknown,
        freed_bytes=freed,
    )


def record_run(
    directory: Directory, report: RetentionReport, *, actor: str = ARCHIVE_ACTOR
) -> None:
    """Record a retention pass in the directory's audit log."""
    details = report.as_dict()
    details.pop("ran_at")
    directory.audit_service(actor, RETENTION_ACTION, "archive", **details)
