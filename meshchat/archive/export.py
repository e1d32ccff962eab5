"""Export a group's archive as JSON Lines, and check exports and the archive for integrity.

An export is one JSON object per line:

1. a header: ``{"format": "meshchat-archive-export", "version": 1, "org", "group", "since",
   "until", "exported_at"}``;
2. one line per envelope, oldest first: the org's key records (an auditor verifies senders
   with them), the compliance copies of the chains that have messages in the range (also when
   the copy is older than the range), and the group's envelopes received in [since, until):
   ``{"seq", "id", "topic", "kind", "group", "name", "etype", "chain_id", "index", "sender",
   "received_at", "size", "sha256", "payload"}`` with the payload in base64;
3. a trailer: ``{"end": true, "count", "chain"}`` where ``chain`` is SHA-256 folded over every
   line before it (``h = sha256(h || line)``, starting from the header line), so a cut, a
   deleted, moved or edited line, and a missing trailer all show.

The chain catches accidents and careless edits, not a forger who recomputes it: the archive holds
no key to sign with. Authenticity comes from the envelopes themselves (each message is signed by
its sender's chain key), which `meshchat audit decrypt` checks.

`verify_export` and `verify_archive` re-derive every header column from the payload and the
topic, so a row whose columns were edited shows too. They check each row as an envelope of the
export header's org, or of the archive's: a row whose topic names another org is damaged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from meshchat.archive.records import (
    Record,
    Rejected,
    RejectReason,
    TopicKind,
    classify,
    digest,
)
from meshchat.archive.store import ArchiveStore, StoredEnvelope
from meshchat.envelope import EnvelopeType
from meshchat.errors import ConfigError

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "ExportCheck",
    "ExportHeader",
    "ExportLine",
    "ExportPlan",
    "ExportSummary",
    "export_group",
    "plan_export",
    "read_export",
    "verify_archive",
    "verify_export",
]

EXPORT_FORMAT: Final = "meshchat-archive-export"
EXPORT_VERSION: Final = 1
MAX_PROBLEMS: Final = 100
"""Problems a check lists at most; it stops there."""
MAX_LINE: Final = 512 * 1024
"""Longest line an export may have: a 256 KiB envelope in base64 and its header columns."""
_RECORD_KEYS: Final = frozenset(
    {
        "seq",
        "id",
        "topic",
        "kind",
        "group",
        "name",
        "etype",
        "chain_id",
        "index",
        "sender",
        "received_at",
        "size",
        "sha256",
        "payload",
    }
)

Progress = Callable[[int], None]


def _line(value: dict[str, object]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _fold(chain: bytes, line: str) -> bytes:
    return hashlib.sha256(chain + line.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class ExportHeader:
    """What an export holds: whose, which group, which time range, made when."""

    org: str
    group: str
    since: float | None
    until: float | None
    exported_at: float

    def as_dict(self) -> dict[str, object]:
        """The header line's fields."""
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "org": self.org,
            "group": self.group,
            "since": self.since,
            "until": self.until,
            "exported_at": self.exported_at,
        }


@dataclass(frozen=True, slots=True)
class ExportLine:
    """One envelope of an export, checked."""

    seq: int
    topic: str
    kind: TopicKind
    etype: EnvelopeType
    chain_id: int | None
    index: int | None
    sender: str | None
    received_at: float
    payload: bytes


@dataclass(frozen=True, slots=True)
class ExportSummary:
    """What an export wrote."""

    path: Path
    count: int
    key_records: int
    copies: int
    group_envelopes: int


def _record_dict(seq: int, envelope: StoredEnvelope) -> dict[str, object]:
    return {
        "seq": seq,
        "id": envelope.id,
        "topic": envelope.topic,
        "kind": envelope.kind.value,
        "group": envelope.group_path,
        "name": envelope.name,
        "etype": envelope.etype.name.lower(),
        "chain_id": envelope.chain_id,
        "index": envelope.chain_index,
        "sender": envelope.sender,
        "received_at": envelope.received_at,
        "size": envelope.size,
        "sha256": envelope.digest.hex(),
        "payload": base64.b64encode(envelope.payload).decode("ascii"),
    }


@dataclass(frozen=True, slots=True)
class ExportPlan:
    """What an export of one group will write, found before it writes (for a progress bar).

    `plan_export` counts from indexes and reads only the header columns of the range (to find
    its chains) and the few older copies; `export_group` then streams the range's envelopes,
    reading each once.

    Attributes:
        group: the group (``dept/group``).
        since: the start of the range.
        until: the end of the range.
        key_records: the org's key records it will hold.
        group_envelopes: the group's envelopes in the range (counted, not read).
        copies: the compliance copies older than the range of the chains with messages in it
            (about one per chain, so few), held here to be written.
    """

    group: str
    since: float | None
    until: float | None
    key_records: int
    group_envelopes: int
    copies: tuple[StoredEnvelope, ...] = field(repr=False)

    @property
    def total(self) -> int:
        """How many lines of envelopes the export will hold."""
        return self.key_records + len(self.copies) + self.group_envelopes


def plan_export(
    store: ArchiveStore, group: str, *, since: float | None, until: float | None
) -> ExportPlan:
    """What an export of `group` in [since, until) will write (blocking: SQLite)."""
    copies: tuple[StoredEnvelope, ...] = ()
    if since is not None:
        chains = store.chains_in(group, since=since, until=until)
        # A chain's copies are few; by chain is the index that finds them fast.
        copies = tuple(c for c in store.copies_of(group, chains) if c.received_at < since)
    return ExportPlan(
        group,
        since,
        until,
        key_records=store.count(kind=TopicKind.KEY, until=until),
        group_envelopes=store.count(group_path=group, since=since, until=until),
        copies=copies,
    )


def export_group(
    store: ArchiveStore,
    out: IO[str],
    header: ExportHeader,
    *,
    path: Path,
    progress: Progress | None = None,
    plan: ExportPlan | None = None,
) -> ExportSummary:
    """Write the export of one group (blocking).

    Args:
        store: the archive.
        out: where the lines go (a text file opened for writing).
        header: the org, group and time range.
        path: the file's name, for the summary.
        progress: called with the number of envelopes written since its last call.
        plan: the `plan_export` of the same group and range, when it was made already.

    Raises:
        ValueError: `plan` is of another group or range.
    """
    if plan is None:
        plan = plan_export(store, header.group, since=header.since, until=header.until)
    elif (plan.group, plan.since, plan.until) != (header.group, header.since, header.until):
        raise ValueError("the plan is of another group or range than the header")
    head = _line(header.as_dict())
    out.write(head + "\n")
    chain = hashlib.sha256(head.encode("utf-8")).digest()
    seq = 0
    counts = {"key": 0, "copy": 0, "group": 0}

    def emit(envelopes: Iterable[StoredEnvelope], what: str) -> None:
        nonlocal chain, seq
        for envelope in envelopes:
            seq += 1
            line = _line(_record_dict(seq, envelope))
            out.write(line + "\n")
            chain = _fold(chain, line)
            counts[what] += 1
            if progress is not None:
                progress(1)

    emit(store.key_records(until=header.until), "key")
    emit(plan.copies, "copy")
    # Streamed: a large group is never held in memory, and its rows are read this once.
    emit(store.group_envelopes(header.group, since=header.since, until=header.until), "group")
    out.write(_line({"end": True, "count": seq, "chain": chain.hex()}) + "\n")
    return ExportSummary(path, seq, counts["key"], counts["copy"], counts["group"])


# -- checking -----------------------------------------------------------------------------------


@dataclass(slots=True)
class ExportCheck:
    """The outcome of a check: what it looked at, and every problem (up to `MAX_PROBLEMS`)."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)
    header: ExportHeader | None = None

    @property
    def ok(self) -> bool:
        """Whether nothing was wrong."""
        return not self.problems

    def add(self, problem: str) -> bool:
        """Note a problem; False once there are too many to go on."""
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        return len(self.problems) < MAX_PROBLEMS


def _mismatch(record: Record, columns: dict[str, object]) -> str | None:
    """The first header column that does not match what the payload and topic say."""
    derived: dict[str, object] = {
        "kind": record.kind.value,
        "group": record.group_path,
        "name": record.name,
        "etype": record.etype.name.lower(),
        "chain_id": record.chain_id,
        "index": record.chain_index,
        "sender": record.sender,
    }
    for key, value in derived.items():
        if columns.get(key) != value:
            return f"{key} says {columns.get(key)!r} but the envelope says {value!r}"
    return None


def _check_columns(
    topic: str, payload: bytes, columns: dict[str, object], *, org: str
) -> str | None:
    """Why the stored columns do not fit the payload (None when they do).

    Args:
        topic: the topic the row or line names.
        payload: its envelope.
        columns: its header columns.
        org: the org of the archive or export, never the one the topic names: a row that
            claims another org is damaged, not checked as that org's.
    """
    try:
        record = classify(topic, payload, org=org, received_at=0.0)
    except Rejected as exc:
        if exc.reason is RejectReason.IGNORED:
            return f"not an envelope of {org}'s archive: {exc}"
        return f"the payload is not an archivable envelope: {exc}"
    return _mismatch(record, columns)


def _parse_header(line: str) -> ExportHeader:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"line 1 is not JSON: {exc.msg}") from exc
    match value:
        case {
            "format": str(fmt),
            "version": int(version),
            "org": str(org),
            "group": str(group),
            "since": since,
            "until": until,
            "exported_at": int() | float() as exported_at,
        } if fmt == EXPORT_FORMAT:
            if version != EXPORT_VERSION:
                raise ConfigError(f"export version {version} is not supported (this is 1)")
            for bound in (since, until):
                if bound is not None and not isinstance(bound, int | float):
                    raise ConfigError("line 1: since and until must be numbers or null")
            return ExportHeader(org, group, since, until, float(exported_at))
    raise ConfigError(f"line 1 is not the header of a {EXPORT_FORMAT} file")


class _BadLineError(Exception):
    """A line of an export that is wrong; the message says how."""


def _payload(value: dict[str, object]) -> bytes:
    """The payload of a record line, checked against its size and digest."""
    encoded = value["payload"]
    if not isinstance(value["topic"], str) or not isinstance(encoded, str):
        raise _BadLineError("topic and payload must be strings")
    try:
        payload = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise _BadLineError("the payload is not base64") from None
    if value["size"] != len(payload):
        raise _BadLineError(f"size {value['size']!r} but the payload has {len(payload)} bytes")
    if value["sha256"] != hashlib.sha256(payload).hexdigest():
        raise _BadLineError("the payload does not match its sha256")
    return payload


def _parse_record(value: object, expected_seq: int, header: ExportHeader) -> ExportLine:
    """An envelope line, checked.

    Raises:
        _BadLineError: it is wrong (the message says how).
    """
    if not isinstance(value, dict) or set(value) != _RECORD_KEYS:
        raise _BadLineError("not an envelope record (wrong fields)")
    if value["seq"] != expected_seq:
        raise _BadLineError(f"sequence number {value['seq']!r} where {expected_seq} belongs")
    payload = _payload(value)
    received_at = value["received_at"]
    if isinstance(received_at, bool) or not isinstance(received_at, int | float):
        raise _BadLineError("received_at must be a number")
    why = _check_columns(value["topic"], payload, value, org=header.org)
    if why is not None:
        raise _BadLineError(why)
    kind = TopicKind(value["kind"])
    if kind is TopicKind.GROUP and value["group"] != header.group:
        raise _BadLineError(f"an envelope of {value['group']}, not of {header.group}")
    if kind is TopicKind.INBOX:
        raise _BadLineError("inbox envelopes do not belong in a group export")
    return ExportLine(
        expected_seq,
        value["topic"],
        kind,
        EnvelopeType[str(value["etype"]).upper()],
        value["chain_id"],
        value["index"],
        value["sender"],
        float(received_at),
        payload,
    )


def _lines(stream: IO[bytes]) -> Iterator[tuple[int, str | None]]:
    """Numbered lines, each at most `MAX_LINE` bytes (None for one that is longer or not UTF-8)."""
    number = 0
    while True:
        raw = stream.readline(MAX_LINE + 2)
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE + 1 or (len(raw) == MAX_LINE + 2 and not raw.endswith(b"\n")):
            yield number, None
            while raw and not raw.endswith(b"\n"):  # skip the rest of the long line
                raw = stream.readline(MAX_LINE)
            continue
        try:
            yield number, raw.decode("utf-8").rstrip("\n")
        except UnicodeDecodeError:
            yield number, None


class _Reader:
    """Checks an export's lines in order, keeping the envelopes when asked to."""

    def __init__(self, keep: list[ExportLine] | None, progress: Progress | None) -> None:
        self.check = ExportCheck()
        self.keep = keep
        self.progress = progress
        self.chain = b""
        self.trailer: dict[str, object] | None = None

    def start(self, first: tuple[int, str | None] | None) -> ExportHeader | None:
        if first is None or first[1] is None:
            self.check.add("line 1: the file is empty or not an export")
            return None
        try:
            header = _parse_header(first[1])
        except ConfigError as exc:
            self.check.add(str(exc))
            return None
        self.check.header = header
        self.chain = hashlib.sha256(first[1].encode("utf-8")).digest()
        return header

    def line(self, number: int, text: str | None, header: ExportHeader) -> bool:
        """Check one line after the header; False when checking should stop."""
        if self.trailer is not None:
            self.check.add(f"line {number}: more lines after the end line")
            return False
        if text is None:
            return self.check.add(f"line {number}: longer than {MAX_LINE} bytes or not UTF-8")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return self.check.add(f"line {number}: not JSON ({exc.msg})")
        if isinstance(value, dict) and value.get("end") is True:
            self.trailer = value
            return True
        self.chain = _fold(self.chain, text)
        self.check.checked += 1
        if self.progress is not None:
            self.progress(1)
        try:
            parsed = _parse_record(value, self.check.checked, header)
        except _BadLineError as exc:
            return self.check.add(f"line {number}: {exc}")
        if self.keep is not None:
            self.keep.append(parsed)
        return True

    def finish(self) -> None:
        trailer, check = self.trailer, self.check
        if trailer is None:
            check.add("the end line is missing: the file was cut short")
        elif trailer.get("count") != check.checked:
            check.add(
                f"the end line counts {trailer.get('count')!r} envelopes; "
                f"the file has {check.checked}"
            )
        elif trailer.get("chain") != self.chain.hex():
            check.add("the end line's chain does not match: a line was edited, moved or deleted")


def _check_stream(
    stream: IO[bytes], keep: list[ExportLine] | None, progress: Progress | None
) -> ExportCheck:
    reader = _Reader(keep, progress)
    lines = _lines(stream)
    header = reader.start(next(lines, None))
    if header is None:
        return reader.check
    for number, text in lines:
        if not reader.line(number, text, header):
            return reader.check
    reader.finish()
    return reader.check


def verify_export(path: Path, *, progress: Progress | None = None) -> ExportCheck:
    """Check an export file line by line (blocking).

    Raises:
        ConfigError: the file cannot be read.
    """
    try:
        with path.open("rb") as stream:
            return _check_stream(stream, None, progress)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc


def read_export(path: Path) -> tuple[ExportHeader, list[ExportLine]]:
    """Read an export, checking all of it first.

    Raises:
        ConfigError: the file cannot be read or fails the check (the first problem is named).
    """
    kept: list[ExportLine] = []
    try:
        with path.open("rb") as stream:
            check = _check_stream(stream, kept, None)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not check.ok or check.header is None:
        more = f" (and {len(check.problems) - 1} more problems)" if len(check.problems) > 1 else ""
        raise ConfigError(f"{path} failed its integrity check: {check.problems[0]}{more}")
    return check.header, kept


def verify_archive(
    store: ArchiveStore, *, org: str, progress: Progress | None = None
) -> ExportCheck:
    """Check the archive: SQLite's integrity check, then every row against its payload.

    Args:
        store: the archive.
        org: the org the archive serves; a row whose topic names another org is damaged.
        progress: called with the number of rows checked since its last call.
    """
    check = ExportCheck()
    for found in store.integrity_problems():
        if not check.add(f"sqlite: {found}"):
            return check
    for row_id, envelope, unreadable in store.all_envelopes():
        check.checked += 1
        if progress is not None:
            progress(1)
        problem: str | None
        if envelope is None:
            problem = unreadable
        elif envelope.size != len(envelope.payload):
            problem = f"size {envelope.size} but the payload has {len(envelope.payload)} bytes"
        elif envelope.digest != digest(envelope.payload):
            problem = "the payload does not match its digest"
        else:
            problem = _check_columns(
                envelope.topic, envelope.payload, _record_dict(0, envelope), org=org
            )
        if problem is not None and not check.add(f"row {row_id}: {problem}"):
            return check
    return check
