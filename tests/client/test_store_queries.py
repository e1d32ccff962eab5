"""The client store's queries about many messages at once: the same answers, in one query each."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshchat.client.store import TEXT, URGENT, ClientStore

G1 = "mc/acme/ops/line1"
G2 = "mc/acme/ops/line2"
MANY = 2000
"""More message ids than SQLite takes as separate parameters in older builds (999)."""


def add(store: ClientStore, group: str, index: int, *, kind: int = TEXT) -> None:
    store.add_message(
        group,
        (7, index),
        sender="bob",
        device="bob-phone",
        kind=kind,
        ts=1000 + index,
        body=f"{group} {index}",
        fields=b"",
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ClientStore]:
    """Two groups with the same message ids; in line1 reactions, and urgent notices, some acked."""
    with ClientStore(tmp_path / "c.db") as opened:
        with opened.transaction():
            for index in range(MANY):
                urgent = index % 100 == 0
                add(opened, G1, index, kind=URGENT if urgent else TEXT)
                add(opened, G2, index)
                if urgent:
                    opened.add_urgent(G1, (7, index), expected=["alice", "carol"])
                if index % 200 == 0:
                    opened.add_ack(G1, (7, index), user="carol", at=2000)
                if index % 7 == 0:
                    opened.add_reaction(G1, (7, index), user="carol", emoji="👍")
                    opened.add_reaction(G1, (7, index), user="alice", emoji="👍")
                    opened.add_reaction(G1, (7, index), user="alice", emoji="🔥")
        yield opened


@contextlib.contextmanager
def counted(store: ClientStore) -> Iterator[list[str]]:
    """The statements run on the store inside the block."""
    statements: list[str] = []
    store.db.conn.set_trace_callback(statements.append)
    try:
        yield statements
    finally:
        store.db.conn.set_trace_callback(None)


IDS = [(7, index) for index in range(MANY)] + [(7, MANY * 3), (8, 0)]
"""Every message of line1, and two ids it does not hold."""


def test_many_messages_by_id_in_one_query(store: ClientStore) -> None:
    with counted(store) as statements:
        found = store.messages_by_id(G1, IDS)
    assert len(statements) == 1
    assert len(found) == MANY  # the ids not here are left out
    assert found == {i: store.message(G1, i) for i in IDS if store.has_message(G1, i)}
    assert {m.group_topic for m in found.values()} == {G1}  # not line2's, with the same ids
    assert store.messages_by_id(G1, []) == {}


def test_reactions_of_many_messages_in_one_query(store: ClientStore) -> None:
    with counted(store) as statements:
        found = store.reactions_by_id(G1, IDS)
    assert len(statements) == 1
    assert found == {i: store.reactions(G1, i) for i in IDS if store.reactions(G1, i)}
    assert found[7, 7] == {"👍": ["alice", "carol"], "🔥": ["alice"]}
    assert list(found[7, 0]) == ["👍", "🔥"]  # in the order `reactions` gives
    assert store.reactions_by_id(G2, IDS) == {}


def test_who_has_not_acknowledged_many_notices_in_one_query(store: ClientStore) -> None:
    with counted(store) as statements:
        found = store.unacknowledged_by_id(G1, IDS)
    assert len(statements) == 1
    expected = {i: store.unacknowledged(G1, i) for i in IDS}
    assert found == {i: missing for i, missing in expected.items() if missing is not None}
    assert (found[7, 0], found[7, 100]) == (["alice"], ["alice", "carol"])
    assert len(found) == MANY // 100  # the messages that are not urgent notices are left out
    assert store.unacknowledged_by_id(G2, IDS) == {}
