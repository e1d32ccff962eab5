"""A device that was offline for a shift reads everything from the archive, once each.

Real E2EE sessions (`tests.e2ee.org`), a real broker and archiver: alice sends 500 messages
while bob's device is away; bob comes back, fetches his inbox history (the chain key alice
sealed to him) and the group's history page by page, decrypts all 500 and shows none twice.
The archive file never holds a byte of what was said.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from meshchat.client import Transport
from meshchat.directory import DirectorySnapshot
from meshchat.e2ee import Decrypted, DeviceSession, Event, Outgoing
from meshchat.rpc import Request
from meshchat.topics import ServiceTopic
from tests.archive.helpers import FAST, LINE1, ORG, ask, make_directory, page_of, running_archiver
from tests.e2ee.org import NOW, Org, text

MESSAGES = 500


@pytest.fixture
def snapshot(tmp_path: Path) -> Iterator[DirectorySnapshot]:
    with make_directory(tmp_path / "directory.db") as directory:
        yield directory.snapshot()


def _sessions() -> tuple[DeviceSession, DeviceSession]:
    org = Org()
    alice_device = org.add_user("alice", "a1")[0]
    bob_device = org.add_user("bob", "b1")[0]
    alice, bob = org.session(alice_device), org.session(bob_device)
    records = {user: org.record(user) for user in ("alice", "bob")}
    roster = org.roster(LINE1, "alice", "bob")
    for session in (alice, bob):
        for user, record in records.items():
            session.on_key_record(user, record)
        session.on_roster(LINE1, roster)
    return alice, bob


def _files(directory: Path, pattern: str) -> bytes:
    """The raw bytes of every file matching `pattern` (the database, its WAL, ...)."""
    return b"".join(path.read_bytes() for path in sorted(directory.glob(pattern)))


def _text(index: int) -> str:
    return f"night shift note {index}: valve {index * 7} pressure nominal"


async def _fetch(bob: Transport, request_of: Callable[[object], Request]) -> list[bytes]:
    """Every payload of a paged request, following the cursor to the end."""
    payloads: list[bytes] = []
    cursor: object = None
    while True:
        items, cursor = page_of(await ask(bob, "bob", request_of(cursor)))
        payloads += [item[6] for item in items]
        if cursor is None:
            return payloads


@contextlib.asynccontextmanager
async def _bob(url: str) -> AsyncIterator[Transport]:
    async with Transport(url, client_id="bob.b1", clean_session=True, backoff=FAST) as bob:
        await bob.subscribe(ServiceTopic(ORG, "archive", "bob", reply=True).topic)
        yield bob


async def test_an_offline_device_fetches_decrypts_and_shows_each_message_once(
    tmp_path: Path, snapshot: DirectorySnapshot
) -> None:
    alice, bob_session = _sessions()
    sent: list[Outgoing] = []
    for index in range(MESSAGES):
        sent += alice.encrypt(LINE1, text(_text(index)), now=NOW)
    group_messages = [item for item in sent if item.topic == LINE1]
    assert len(group_messages) == MESSAGES
    async with running_archiver(tmp_path, snapshot) as running:
        async with Transport(running.url, client_id="alice.a1", backoff=FAST) as alice_link:
            for item in sent:  # bob's device is away: it gets none of this live
                alice_link.publish_nowait(item.topic, item.payload)
            await running.settled(len(sent))
        events: list[Event] = []
        # Before it went away, bob's device had read the first 100 live.
        inbox_now = [item for item in sent if item.topic == f"mc/{ORG}/_d/b1"]
        for item in inbox_now:
            events += bob_session.on_inbox(item.payload).events
        for item in group_messages[:100]:
            events += bob_session.on_group_message(LINE1, item.payload).events
        async with _bob(running.url) as bob:
            inbox = await _fetch(bob, lambda cursor: Request("inbox", ("b1", None, cursor)))
            history = await _fetch(
                bob, lambda cursor: Request("history", ("ops/line1", None, None, cursor, 120))
            )
        assert len(inbox) == len(inbox_now) >= 1
        for payload in inbox:  # the same distribution again: harmless
            events += bob_session.on_inbox(payload).events
        for payload in history:
            events += bob_session.on_group_message(LINE1, payload, history=True).events
        with running.store() as store:
            store.vacuum()
        raw = _files(tmp_path, "archive.db*")
    read = [event for event in events if isinstance(event, Decrypted)]
    assert [event.inner.fields[0] for event in read] == [_text(i) for i in range(MESSAGES)]
    assert len({event.message_id for event in read}) == MESSAGES  # none twice
    assert {event.sender for event in read} == {"alice"}
    assert not [event for event in events if not isinstance(event, Decrypted)]
    assert history == [item.payload for item in group_messages]
    # Not one sent text, nor a distinctive part of one, is anywhere in the archive's files.
    for index in range(MESSAGES):
        assert _text(index).encode() not in raw
    assert b"night shift" not in raw
    assert b"pressure nominal" not in raw
