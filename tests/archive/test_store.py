"""The archive file: idempotent inserts, bounded pages, exact gap fill, a file that can shrink."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from meshchat.archive import (
    ITEM_OVERHEAD,
    MAX_PAGE_ITEMS,
    REPLY_BUDGET,
    ArchiveStore,
    Query,
    answer,
)
from meshchat.envelope import MAX_BODY_LEN, EnvelopeType
from meshchat.errors import ConfigError
from meshchat.rpc import MAX_RPC_LEN, Reply, Request, decode_reply
from tests.archive.helpers import LINE1, LINE2, copy, message, record


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ArchiveStore]:
    with ArchiveStore(tmp_path / "archive.db") as opened:
        yield opened


def test_a_fresh_archive_is_private_wal_and_incrementally_vacuumed(tmp_path: Path) -> None:
    path = tmp_path / "archive.db"
    with ArchiveStore(path) as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
        store.insert([record(LINE1, message(1, 1), 1.0)])
        files = sorted(tmp_path.glob("archive.db*"))
        assert [f.name for f in files] == ["archive.db", "archive.db-shm", "archive.db-wal"]
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    with pytest.raises(ConfigError, match="no archive at"):
        ArchiveStore(tmp_path / "missing.db", create=False)
    (tmp_path / "junk.db").write_bytes(b"not sqlite" * 100)
    with pytest.raises(ConfigError, match="not a usable archive"):
        ArchiveStore(tmp_path / "junk.db")


def test_a_redelivered_envelope_is_stored_once_but_a_forgery_for_its_id_is_kept(
    store: ArchiveStore,
) -> None:
    payload = message(7, 1)
    assert store.insert([record(LINE1, payload, 1.0)]) == 1
    # The same bytes again, later and twice in one batch: nothing new.
    assert store.insert([record(LINE1, payload, 2.0), record(LINE1, payload, 3.0)]) == 0
    # Another envelope claiming (7, 1): kept beside it, so a planted forgery cannot
    # push the real message out; readers tell them apart by the chain's signature.
    assert store.insert([record(LINE1, message(7, 1), 4.0)]) == 1
    # The same bytes on another group are another message.
    assert store.insert([record(LINE2, payload, 5.0)]) == 1
    assert store.count() == 3
    assert store.count(group_path="ops/line1") == 2


def test_history_pages_by_time_both_ways_and_leaves_out_compliance_copies(
    store: ArchiveStore,
) -> None:
    store.insert([record(LINE1, copy("ops/line1", 1), 0.5)])
    store.insert([record(LINE1, message(1, i), 10.0 + i) for i in range(25)])
    store.insert([record(LINE2, message(2, i), 10.0 + i) for i in range(5)])
    seen: list[int] = []
    after = None
    while True:
        page = store.history("ops/line1", since=12.0, until=30.0, after=after, limit=7)
        seen += [item.chain_index or 0 for item in page.items]
        assert all(item.etype is EnvelopeType.GROUP for item in page.items)
        if page.next is None:
            break
        after = page.next
    assert seen == list(range(2, 20))
    newest = store.history("ops/line1", newest_first=True, limit=3)
    assert [item.chain_index for item in newest.items] == [24, 23, 22]
    older = store.history("ops/line1", newest_first=True, limit=3, after=newest.next)
    assert [item.chain_index for item in older.items] == [21, 20, 19]


def test_gap_fill_returns_exactly_the_indices_asked_for(store: ArchiveStore) -> None:
    store.insert([record(LINE1, message(5, i), float(i)) for i in range(100) if i % 10 != 3])
    store.insert([record(LINE1, message(6, i), float(i)) for i in range(100)])  # another chain
    page = store.gap("ops/line1", 5, 20, 44)
    assert [item.chain_index for item in page.items] == [i for i in range(20, 45) if i % 10 != 3]
    assert {item.chain_id for item in page.items} == {5}
    assert page.next is None
    first = store.gap("ops/line1", 5, 0, 99, limit=10)
    rest = store.gap("ops/line1", 5, 0, 99, after=first.next)
    assert [i.chain_index for i in first.items + rest.items] == [
        i for i in range(100) if i % 10 != 3
    ]


def test_a_reply_stays_under_the_rpc_limit_whatever_the_envelopes(store: ArchiveStore) -> None:
    small = [record(LINE1, message(1, i, body_len=20), float(i)) for i in range(MAX_PAGE_ITEMS + 5)]
    big = [record(LINE1, message(2, i, body_len=40_000), 1000.0 + i) for i in range(4)]
    huge = [record(LINE1, message(3, 0, body_len=MAX_BODY_LEN - 64), 2000.0)]
    store.insert(small + big + huge)
    request = Request("history", ("ops/line1",))
    pages = []
    cursor = None
    while True:
        value = answer(store, Query("history", "ops/line1", cursor=cursor))
        encoded = Reply.success(request, value).encode()
        assert len(encoded) <= MAX_RPC_LEN
        reply = decode_reply(encoded)  # the client's own bounded decoder takes it
        assert isinstance(reply.value, list)
        items, next_cursor = reply.value
        assert isinstance(items, list)
        pages.append(items)
        if next_cursor is None:
            break
        assert isinstance(next_cursor, list)
        cursor = (float(next_cursor[0]), int(next_cursor[1]))
    everything = [item for page in pages for item in page]
    assert len(everything) == len(small) + len(big) + len(huge)
    assert 300 < len(pages[0]) <= MAX_PAGE_ITEMS  # small envelopes: many to a page
    # An envelope too big for any reply is listed with its header and without its payload.
    [listed] = [item for item in everything if item[3] == 3]
    assert listed[5] == len(huge[0].payload)
    assert listed[6] is None
    assert all(item[6] is not None for item in everything if item[3] != 3)
    assert REPLY_BUDGET + 2048 == MAX_RPC_LEN
    widest = [2**63 - 1, 1e9, 3, 2**32 - 1, 2**32 - 1, 2**18, b"x" * 70_000]
    assert len(msgpack.packb(widest, use_bin_type=True)) - 70_000 <= ITEM_OVERHEAD
