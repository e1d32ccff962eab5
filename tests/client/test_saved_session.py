"""The session kept in a profile's store in parts: a failed save is never half remembered."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from meshchat.client._saved import SESSION_KEY, save_session, saved_session, saving
from meshchat.client.store import ClientStore
from tests.e2ee.org import LINE1, Net, Org


@pytest.fixture
def net() -> Net:
    org = Org()
    org.add_user("alice", "a1")
    org.add_user("bob", "b1")
    org.add_user("carol", "c1")
    net = Net(org)
    for devices in org.devices.values():
        for device in devices:
            net.join(device)
    for user in org.devices:
        net.broadcast_record(user)
    net.broadcast_roster(LINE1, "alice", "bob", "carol")
    return net


def restore(net: Net, store: ClientStore) -> bytes:
    b1 = net.org.devices["bob"][0]
    session = saved_session(store, trust=net.org.trust, signing=b1.signing, box=b1.box)
    assert session is not None
    return session.to_bytes()


def _refuse_writes(action: int, table: str | None, *_: object) -> int:
    writing = action in {sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE}
    return sqlite3.SQLITE_DENY if writing and table == "state" else sqlite3.SQLITE_OK


def test_a_save_that_failed_after_taking_the_changes_makes_the_next_one_whole(
    net: Net, tmp_path: Path
) -> None:
    b1 = net.sessions["b1"]
    with ClientStore(tmp_path / "client.db") as store:
        save_session(store, b1)
        net.send("a1", LINE1, "read while the disk is full")  # b1 reads it: its chain moved
        store.db.conn.set_authorizer(_refuse_writes)
        with pytest.raises(sqlite3.DatabaseError), saving(store, b1):
            pass
        store.db.conn.set_authorizer(None)
        assert restore(net, store) != b1.to_bytes()  # nothing of the failed save was kept
        save_session(store, b1)
        assert restore(net, store) == b1.to_bytes()


def test_a_store_holding_the_old_single_blob_is_read_and_moved_over(
    net: Net, tmp_path: Path
) -> None:
    b1 = net.sessions["b1"]
    with ClientStore(tmp_path / "client.db") as store:
        store.put(SESSION_KEY, b1.to_bytes())
        assert restore(net, store) == b1.to_bytes()  # read as it is (the hand-off does)


def test_chains_come_back_in_the_order_they_arrived_after_later_saves(
    net: Net, tmp_path: Path
) -> None:
    # Which chains a reader forgets first depends on that order, so it must survive a restart.
    b1 = net.sessions["b1"]
    with ClientStore(tmp_path / "client.db") as store:
        net.send("c1", LINE1, "carol's chain first")
        save_session(store, b1)
        net.send("a1", LINE1, "alice's chain second")
        save_session(store, b1)
        net.send("c1", LINE1, "carol's chain again: its part is written last")
        save_session(store, b1)
        assert restore(net, store) == b1.to_bytes()
