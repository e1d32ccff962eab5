"""The hash-chained audit log: every admin action, linked so any edit, deletion or reorder shows."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from meshchat.errors import AuditChainError

__all__ = ["GENESIS", "AuditEntry", "chain_hash", "verify_chain"]

GENESIS: Final = "0" * 64
_PERSON: Final = b"meshchat-audit1"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One admin action as recorded."""

    seq: int
    ts: float
    actor: str
    action: str
    target: str
    details: str
    prev_hash: str
    hash: str

    @property
    def details_dict(self) -> dict[str, Any]:
        """The details as a dict (they are stored as canonical JSON)."""
        loaded: dict[str, Any] = json.loads(self.details)
        return loaded


def canonical_details(details: dict[str, Any]) -> str:
    """Details as canonical JSON, so the hash does not depend on key order."""
    return json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_hash(
    prev_hash: str, seq: int, *, ts: float, actor: str, action: str, target: str, details: str
) -> str:
    """The hash of one row: BLAKE2b-256 over the previous hash and every field of the row."""
    material = json.dumps(
        [prev_hash, seq, repr(ts), actor, action, target, details], ensure_ascii=False
    ).encode("utf-8")
    return hashlib.blake2b(material, digest_size=32, person=_PERSON).hexdigest()


def verify_chain(entries: Iterable[AuditEntry], head: tuple[int, str] | None) -> int:
    """Check the chain in sequence order and against the recorded head.

    Args:
        entries: the rows in the order they are stored (by sequence number).
        head: the last (seq, hash) recorded beside the log, or None for an empty log.

    Returns:
        The number of rows checked.

    Raises:
        AuditChainError: naming the first row that was edited, deleted, inserted or moved.
    """
    expected_prev = GENESIS
    expected_seq = 1
    count = 0
    for entry in entries:
        if entry.seq != expected_seq:
            what = "missing" if entry.seq > expected_seq else "out of order"
            raise AuditChainError(
                f"audit row {expected_seq} is {what} (found row {entry.seq} in its place)",
                seq=expected_seq,
            )
        if not hmac.compare_digest(entry.prev_hash, expected_prev):
            raise AuditChainError(
                f"audit row {entry.seq} does not link to the row before it", seq=entry.seq
            )
        recomputed = chain_hash(
            entry.prev_hash,
            entry.seq,
            ts=entry.ts,
            actor=entry.actor,
            action=entry.action,
            target=entry.target,
            details=entry.details,
        )
        if not hmac.compare_digest(recomputed, entry.hash):
            raise AuditChainError(
                f"audit row {entry.seq} was edited (its hash does not match its content)",
                seq=entry.seq,
            )
        expected_prev = entry.hash
        expected_seq += 1
        count += 1
    head_seq, head_hash = head if head is not None else (0, GENESIS)
    if head_seq != count or not hmac.compare_digest(head_hash, expected_prev):
        raise AuditChainError(
            f"audit log ends at row {count} but row {head_seq} was the last one written: "
            f"rows after {count} were deleted",
            seq=count + 1,
        )
    return count
