"""The compliance report: chains with messages but no compliance copy where policy wants one.

In a group whose policy asks for compliance, every sender's chain must have a compliance copy
(a ``DIST`` envelope sealed to the org compliance key, on the group topic). A chain reported
here has messages the auditor can never read. Only chains with a message received since
compliance was (last) turned on for the group count: chains that ended before are not a breach.

The report reads headers only (the archive holds no key): a copy is counted when one names the
chain. `meshchat audit decrypt` is the cryptographic check that each copy really opens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from meshchat.archive.store import ArchiveStore, ChainSummary
from meshchat.directory.audit import AuditEntry
from meshchat.directory.model import Group

__all__ = ["ComplianceReport", "compliance_report", "compliance_since"]

_TURNS_ON: Final = frozenset({"group.create", "group.policy"})


def compliance_since(groups: Iterable[Group], entries: Iterable[AuditEntry]) -> dict[str, float]:
    """When compliance was last turned on, for every group whose policy asks for it now.

    Read from the directory's audit log (``group.create`` and ``group.policy`` rows); a group
    with no such row counts from the beginning (0.0).
    """
    wanted = {group.path: 0.0 for group in groups if group.compliance}
    for entry in entries:
        if (
            entry.action in _TURNS_ON
            and entry.target in wanted
            and entry.details_dict.get("compliance") is True
        ):
            wanted[entry.target] = entry.ts
    return wanted


@dataclass(frozen=True, slots=True)
class ComplianceReport:
    """Chains without a compliance copy in groups whose policy requires one.

    Attributes:
        since: the groups checked, and since when each requires copies.
        checked: chains with messages since then.
        missing: those of them without a copy.
    """

    since: dict[str, float] = field(default_factory=dict)
    checked: int = 0
    missing: list[ChainSummary] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every chain has its copy."""
        return not self.missing


def compliance_report(store: ArchiveStore, since: Mapping[str, float]) -> ComplianceReport:
    """Check the archive against the groups that require compliance copies (blocking)."""
    checked = 0
    missing: list[ChainSummary] = []
    for path, start in sorted(since.items()):
        copied = store.copied_chains(path)
        for chain in store.chains(path):
            if chain.last_received < start:
                continue
            checked += 1
            if chain.chain_id not in copied:
                missing.append(chain)
    return ComplianceReport(dict(since), checked, missing)
