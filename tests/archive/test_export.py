"""Exports hold what an auditor needs, in order; any cut, edit or reorder shows on verify."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshchat.archive import (
    ArchiveStore,
    ExportHeader,
    TopicKind,
    export_group,
    plan_export,
    read_export,
    verify_archive,
    verify_export,
)
from meshchat.envelope import EnvelopeType, Signed, encode
from meshchat.errors import ConfigError
from tests.archive.helpers import LINE1, LINE2, ORG, copy, message, record


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ArchiveStore]:
    with ArchiveStore(tmp_path / "archive.db") as opened:
        key = encode(Signed("bob", b"record", os.urandom(64)))
        opened.insert(
            [
                record(f"mc/{ORG}/_k/bob", key, 1.0),
                record(LINE1, copy("ops/line1", 1), 5.0),  # chain 1's copy, before the range
                record(LINE1, copy("ops/line1", 9), 6.0),  # chain 9 has nothing in the range
                *(record(LINE1, message(9, i), 7.0 + i) for i in range(3)),
                *(record(LINE1, message(1, i), 100.0 + i) for i in range(5)),
                record(LINE2, message(3, 0), 101.0),
                record(f"mc/{ORG}/_d/b1", copy("ops/line1", 1), 102.0),
            ]
        )
        yield opened


def _export(store: ArchiveStore, path: Path, since: float | None = 100.0) -> None:
    header = ExportHeader(ORG, "ops/line1", since, 200.0, 300.0)
    plan = plan_export(store, "ops/line1", since=since, until=200.0)
    with path.open("w", encoding="utf-8") as out:
        summary = export_group(store, out, header, path=path, plan=plan)
    assert summary.count == plan.total


def test_an_export_holds_key_records_the_copies_it_needs_and_the_range(
    store: ArchiveStore, tmp_path: Path
) -> None:
    path = tmp_path / "line1.jsonl"
    _export(store, path)
    assert verify_export(path).ok
    header, lines = read_export(path)
    assert (header.org, header.group, header.since, header.until) == (ORG, "ops/line1", 100, 200)
    assert [(line.kind, line.etype, line.chain_id) for line in lines] == [
        (TopicKind.KEY, EnvelopeType.SIGNED, None),
        (TopicKind.GROUP, EnvelopeType.DIST, 1),  # older than the range, but its chain is in it
        *[(TopicKind.GROUP, EnvelopeType.GROUP, 1)] * 5,
    ]
    assert [line.index for line in lines[2:]] == [0, 1, 2, 3, 4]
    first = json.loads(path.read_text().splitlines()[3])
    assert base64.b64decode(first["payload"]) == lines[2].payload
    everything = tmp_path / "all.jsonl"
    _export(store, everything, since=None)
    assert [
        line.chain_id for line in read_export(everything)[1] if line.kind is TopicKind.GROUP
    ] == [
        1,
        9,
        9,
        9,
        9,
        1,
        1,
        1,
        1,
        1,
    ]


def test_an_export_reads_the_groups_envelopes_once_and_its_bar_counts_every_line(
    store: ArchiveStore, tmp_path: Path
) -> None:
    path = tmp_path / "line1.jsonl"
    header = ExportHeader(ORG, "ops/line1", 100.0, 200.0, 300.0)
    statements: list[str] = []
    ticks: list[int] = []
    store.conn.set_trace_callback(statements.append)
    try:
        # What `meshchat archive export` does: plan (the bar's total), then write.
        plan = plan_export(store, header.group, since=header.since, until=header.until)
        with path.open("w", encoding="utf-8") as out:
            summary = export_group(store, out, header, path=path, progress=ticks.append, plan=plan)
    finally:
        store.conn.set_trace_callback(None)
    # A large group costs one pass over its envelopes, not four.
    reads = [s for s in statements if "CAST(payload AS BLOB)" in s and "received_at >= " in s]
    assert len(reads) == 1, reads
    assert sum(ticks) == plan.total == summary.count == 7
    assert verify_export(path).ok


def _edit(path: Path, change: Callable[[list[str]], list[str]]) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(change(lines)) + "\n", encoding="utf-8")


def _flip_payload(lines: list[str]) -> list[str]:
    value = json.loads(lines[3])
    payload = bytearray(base64.b64decode(value["payload"]))
    payload[-1] ^= 1
    value["payload"] = base64.b64encode(payload).decode()
    return [*lines[:3], json.dumps(value, sort_keys=True, separators=(",", ":")), *lines[4:]]


def _relabel(lines: list[str]) -> list[str]:
    value = json.loads(lines[3])
    value["index"] = 99  # the header column lies about the envelope
    return [*lines[:3], json.dumps(value, sort_keys=True, separators=(",", ":")), *lines[4:]]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda lines: lines[:-1], "the end line is missing"),
        (lambda lines: lines[:-3] + lines[-2:], "sequence number"),
        (lambda lines: [lines[0], lines[2], lines[1], *lines[3:]], "sequence number"),
        (_flip_payload, "does not match its sha256"),
        (_relabel, "index says 99 but the envelope says 0"),
        (lambda lines: [*lines, lines[-1]], "more lines after the end line"),
        (lambda lines: [lines[0], "{not json", *lines[1:]], "not JSON"),
        (lambda lines: ["{}", *lines[1:]], "not the header"),
    ],
)
def test_verify_names_the_problem_of_a_damaged_export(
    store: ArchiveStore, tmp_path: Path, change: Callable[[list[str]], list[str]], says: str
) -> None:
    path = tmp_path / "line1.jsonl"
    _export(store, path)
    _edit(path, change)
    check = verify_export(path)
    assert not check.ok
    assert any(says in problem for problem in check.problems), check.problems
    with pytest.raises(ConfigError, match="failed its integrity check"):
        read_export(path)


def _rechain(lines: list[str]) -> list[str]:
    """The lines with the end line's chain recomputed, as a careful forger would."""
    chain = hashlib.sha256(lines[0].encode("utf-8")).digest()
    for line in lines[1:-1]:
        chain = hashlib.sha256(chain + line.encode("utf-8")).digest()
    end = json.loads(lines[-1])
    end["chain"] = chain.hex()
    return [*lines[:-1], json.dumps(end, sort_keys=True, separators=(",", ":"))]


def _move_to_another_org(lines: list[str]) -> list[str]:
    value = json.loads(lines[3])
    value["topic"] = value["topic"].replace(f"mc/{ORG}/", "mc/other/")
    return _rechain(
        [*lines[:3], json.dumps(value, sort_keys=True, separators=(",", ":")), *lines[4:]]
    )


def test_an_export_line_that_claims_another_org_is_damaged_even_rechained(
    store: ArchiveStore, tmp_path: Path
) -> None:
    path = tmp_path / "line1.jsonl"
    _export(store, path)
    _edit(path, _move_to_another_org)
    assert verify_export(path).problems == [
        f"line 4: not an envelope of {ORG}'s archive: mc/other/ops/line1 belongs to another org"
    ]
    with pytest.raises(ConfigError, match="line 4: not an envelope of acme's archive"):
        read_export(path)


def test_an_edited_chain_of_lines_shows_even_when_every_line_is_consistent(
    store: ArchiveStore, tmp_path: Path
) -> None:
    path = tmp_path / "line1.jsonl"
    _export(store, path)
    # Drop the last envelope and renumber nothing else: the count and the chain both know.
    _edit(path, lambda lines: [*lines[:-2], lines[-1]])
    problems = verify_export(path).problems
    assert problems == ["the end line counts 7 envelopes; the file has 6"]


def test_a_line_too_long_or_not_utf8_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\xff\xfe\n" + b"x" * (600 * 1024) + b"\n")
    check = verify_export(path)
    assert check.problems == ["line 1: the file is empty or not an export"]
    with pytest.raises(ConfigError, match="cannot read"):
        verify_export(tmp_path / "missing.jsonl")


def test_verify_archive_finds_edited_rows_and_sqlite_damage(store: ArchiveStore) -> None:
    check = verify_archive(store, org=ORG)
    assert (check.ok, check.checked) == (True, store.count())
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE envelopes SET chain_index = 7 WHERE id = 4")
        conn.execute("UPDATE envelopes SET payload = payload || x'00' WHERE id = 5")
        conn.execute("UPDATE envelopes SET group_path = 'ops/line2' WHERE id = 6")
        conn.execute("UPDATE envelopes SET kind = 'nonsense' WHERE id = 7")
    problems = verify_archive(store, org=ORG).problems
    assert problems[0] == "row 4: index says 7 but the envelope says 0"
    assert problems[1].startswith("row 5: size ")
    assert problems[2] == "row 6: group says 'ops/line2' but the envelope says 'ops/line1'"
    assert problems[3].startswith("row 7: unreadable: 'nonsense' is not a valid TopicKind")
    assert len(problems) == 4


def test_verify_archive_checks_every_row_as_the_archives_org(store: ArchiveStore) -> None:
    with sqlite3.connect(store.path) as conn:
        for row_id in (1, 4, 13):  # a key record, a group message, an inbox envelope
            conn.execute(
                "UPDATE envelopes SET topic = replace(topic, 'mc/acme/', 'mc/other/') WHERE id = ?",
                (row_id,),
            )
    problems = verify_archive(store, org=ORG).problems
    assert problems == [
        f"row {row_id}: not an envelope of {ORG}'s archive: {topic} belongs to another org"
        for row_id, topic in [
            (1, "mc/other/_k/bob"),
            (4, "mc/other/ops/line1"),
            (13, "mc/other/_d/b1"),
        ]
    ]
