"""The archiver: durable, ciphertext-only history of groups, inboxes and key records.

It never holds a key (an import-linter contract keeps `meshchat.e2ee` out, even indirectly):
it stores envelopes as they arrived, with the header columns every envelope shows in the clear,
answers history and gap requests to members, applies retention per group policy, reports
chains without a compliance copy, and exports and checks what it holds.
"""

from meshchat.archive.compliance import ComplianceReport, compliance_report, compliance_since
from meshchat.archive.export import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    ExportCheck,
    ExportHeader,
    ExportLine,
    ExportPlan,
    ExportSummary,
    export_group,
    plan_export,
    read_export,
    verify_archive,
    verify_export,
)
from meshchat.archive.records import (
    ACCEPTED,
    Record,
    Rejected,
    RejectReason,
    TopicKind,
    classify,
    digest,
    dist_chain,
)
from meshchat.archive.requests import (
    ITEM_OVERHEAD,
    MAX_GAP_SPAN,
    MAX_PAGE_ITEMS,
    REPLY_BUDGET,
    Query,
    RefusedError,
    answer,
    authorize,
)
from meshchat.archive.retention import (
    ARCHIVE_ACTOR,
    DAY,
    RETENTION_ACTION,
    GroupPolicy,
    RetentionReport,
    policies_of,
    record_run,
    run_retention,
)
from meshchat.archive.schema import MIGRATIONS
from meshchat.archive.service import (
    DEFAULT_INBOX_RETENTION_DAYS,
    DEFAULT_RETENTION_INTERVAL,
    Archiver,
    ArchiveStats,
)
from meshchat.archive.store import (
    ARCHIVE_FILE,
    COLUMNS,
    ArchiveStore,
    ChainSummary,
    Cursor,
    Page,
    StoredEnvelope,
)
from meshchat.archive.writer import THREAD_NAME, ArchiveWriter, WriterState

__all__ = [
    "ACCEPTED",
    "ARCHIVE_ACTOR",
    "ARCHIVE_FILE",
    "COLUMNS",
    "DAY",
    "DEFAULT_INBOX_RETENTION_DAYS",
    "DEFAULT_RETENTION_INTERVAL",
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "ITEM_OVERHEAD",
    "MAX_GAP_SPAN",
    "MAX_PAGE_ITEMS",
    "MIGRATIONS",
    "REPLY_BUDGET",
    "RETENTION_ACTION",
    "THREAD_NAME",
    "ArchiveStats",
    "ArchiveStore",
    "ArchiveWriter",
    "Archiver",
    "ChainSummary",
    "ComplianceReport",
    "Cursor",
    "ExportCheck",
    "ExportHeader",
    "ExportLine",
    "ExportPlan",
    "ExportSummary",
    "GroupPolicy",
    "Page",
    "Query",
    "Record",
    "RefusedError",
    "RejectReason",
    "Rejected",
    "RetentionReport",
    "StoredEnvelope",
    "TopicKind",
    "WriterState",
    "answer",
    "authorize",
    "classify",
    "compliance_report",
    "compliance_since",
    "digest",
    "dist_chain",
    "export_group",
    "plan_export",
    "policies_of",
    "read_export",
    "record_run",
    "run_retention",
    "verify_archive",
    "verify_export",
]
