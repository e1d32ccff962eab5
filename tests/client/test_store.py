"""The client store: nothing sent is lost across a crash, messages once, search over plaintext."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from meshchat.client.store import ACK, EDIT, REACT, RECALL, RECEIPT, TEXT, URGENT, ClientStore
from meshchat.errors import ConfigError

G1 = "mc/acme/ops/line1"
G2 = "mc/acme/ops/line2"


def add(
    store: ClientStore,
    index: int,
    body: str,
    *,
    kind: int = TEXT,
    group: str = G1,
    sender: str = "alice",
    ts: int | None = None,
    target: tuple[int, int] | None = None,
) -> bool:
    return store.add_message(
        group,
        (7, index),
        sender=sender,
        device=f"{sender}-phone",
        kind=kind,
        ts=1000 + index if ts is None else ts,
        body=body,
        fields=b"",
        target=target,
    )


def test_the_store_file_is_private(tmp_path: Path) -> None:
    with ClientStore(tmp_path / "profile" / "client.db") as store:
        store.put("session", b"secret state")
    assert stat.S_IMODE((tmp_path / "profile" / "client.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "profile").stat().st_mode) == 0o700


def test_a_queued_message_survives_a_crash_and_goes_out_in_order(tmp_path: Path) -> None:
    path = tmp_path / "client.db"
    store = ClientStore(path)
    first = store.enqueue(G1, b"one")
    second = store.enqueue(G1, b"two")
    with store.transaction():
        store.seal(
            first, [("mc/acme/_d/bob-phone", b"dist"), (G1, b"envelope-one")], message_id=(9, 0)
        )
        store.put_many({"session/core": b"after one", "session/chain:x": b"chain"})
    store.db.conn.close()  # the process dies here: nothing was acknowledged
    reopened = ClientStore(path)
    items = reopened.outbox()
    assert [item.id for item in items] == [first, second]
    assert items[0].sealed == (("mc/acme/_d/bob-phone", b"dist"), (G1, b"envelope-one"))
    assert items[1].sealed is None
    assert items[1].inner == b"two"
    # sealed together with the outbox row
    assert reopened.get_prefixed("session/") == {"core": b"after one", "chain:x": b"chain"}
    assert reopened.queued == 2
    reopened.sent(first)
    assert [item.inner for item in reopened.outbox()] == [b"two"]


def test_a_redelivered_message_is_stored_once(tmp_path: Path) -> None:
    with ClientStore(tmp_path / "c.db") as store:
        assert add(store, 0, "hello")
        assert not add(store, 0, "hello")
        assert [m.body for m in store.history(G1)] == ["hello"]


def test_edits_and_recalls_change_the_message_in_place(tmp_path: Path) -> None:
    with ClientStore(tmp_path / "c.db") as store:
        add(store, 0, "meet at 10")
        add(store, 1, "drop the pallet")
        add(store, 2, "meet at 11", kind=EDIT, target=(7, 0))
        add(store, 3, "", kind=RECALL, target=(7, 1))
        add(store, 4, "hijack", kind=EDIT, target=(7, 0), sender="mallory")
        shown = store.history(G1)
        assert [(m.body, m.recalled, m.edited_at is not None) for m in shown] == [
            ("meet at 11", False, True),
            ("", True, False),
        ]
        assert store.search("pallet") == []  # a recalled message is gone from search
        assert [m.body for m in store.search("11")] == ["meet at 11"]


def test_search_by_words_group_and_time(tmp_path: Path) -> None:
    with ClientStore(tmp_path / "c.db") as store:
        add(store, 0, "Forklift battery low", ts=100)
        add(store, 1, "forklift fixed", ts=200)
        add(store, 2, "forklift in line 2", ts=300, group=G2)
        add(store, 3, "lunch", ts=400)
        assert [m.body for m in store.search("forklift")] == [
            "Forklift battery low",
            "forklift fixed",
            "forklift in line 2",
        ]
        assert [m.body for m in store.search("fork", group_topic=G1)] == [
            "Forklift battery low",
            "forklift fixed",
        ]
        assert [m.body for m in store.search("forklift", since=150, until=300)] == [
            "forklift fixed"
        ]
        assert [m.body for m in store.search('battery" OR "lunch')] == []  # no FTS syntax
        with pytest.raises(ValueError, match="at least one word"):
            store.search("  --  ")


def test_history_returns_the_newest_messages_oldest_first(tmp_path: Path) -> None:
    with ClientStore(tmp_path / "c.db") as store:
        for index in range(10):
            add(store, index, f"m{index}")
        assert [m.body for m in store.history(G1, limit=3)] == ["m7", "m8", "m9"]
        assert [m.body for m in store.history(G1, since=1005)] == ["m5", "m6", "m7", "m8", "m9"]


def test_history_lists_messages_not_the_reactions_receipts_and_acks_about_them(
    tmp_path: Path,
) -> None:
    with ClientStore(tmp_path / "c.db") as store:
        add(store, 0, "dock 4 closed", kind=URGENT)
        add(store, 1, "+1", kind=REACT, sender="bob", target=(7, 0))
        add(store, 2, "", kind=RECEIPT, sender="bob")
        add(store, 3, "", kind=ACK, sender="bob", target=(7, 0))
        add(store, 4, "noted")
        assert [m.body for m in store.history(G1)] == ["dock 4 closed", "noted"]
        assert len(store.history(G1, include_meta=True)) == 5


def test_unreadable_messages_keep_their_reason(tmp_path: Path) -> None:
    with ClientStore(tmp_path / "c.db") as store:
        store.add_notice(G1, (3, 0), reason="sent before you joined", code="withheld")
        assert store.notices(G1) == [((3, 0), "sent before you joined", "withheld")]


def test_a_file_that_is_not_a_store_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="cannot be used"):
        ClientStore(path)


def test_notices_awaiting_my_ack_are_found_however_old(tmp_path: Path) -> None:
    with ClientStore(tmp_path / "c.db") as store, store.transaction():
        add(store, 0, "evacuate hall B", kind=URGENT, sender="bob")
        store.add_urgent(G1, (7, 0), expected=["alice", "carol"])
        for index in range(1, 700):  # a long, busy day since
            add(store, index, f"m{index}")
        add(store, 700, "my own notice", kind=URGENT, sender="carol")
        store.add_urgent(G1, (7, 700), expected=["alice", "carol"])
        add(store, 701, "recalled notice", kind=URGENT, sender="bob")
        store.add_urgent(G1, (7, 701), expected=["carol"])
        add(store, 702, "", kind=RECALL, sender="bob", target=(7, 701))
        add(store, 703, "for alice only", kind=URGENT, sender="bob")
        store.add_urgent(G1, (7, 703), expected=["alice"])
    with ClientStore(tmp_path / "c.db") as store:
        assert store.awaiting_ack(G1, "carol") == [(7, 0)]
        assert store.awaiting_ack(G1, "alice") == [(7, 0), (7, 700), (7, 703)]
        store.add_ack(G1, (7, 0), user="carol", at=2000)
        assert store.awaiting_ack(G1, "carol") == []
