"""Message kinds between three real clients: urgent notices and acks, edits, recalls, receipts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import pytest

from meshchat.client.core import AckStatus, Client, ClientEvent, Mention, Message
from meshchat.e2ee import Kind
from meshchat.errors import PermissionDeniedError
from tests.client.conftest import Site

LINE1 = "mc/acme/ops/line1"


async def wait_event(client: Client, check: Callable[[ClientEvent], bool]) -> ClientEvent:
    async with asyncio.timeout(10):
        async for event in client.events():
            if check(event):
                return event
    raise AssertionError("no such event")


async def said(client: Client, text: str, kind: Kind = Kind.TEXT) -> Message:
    event = await wait_event(
        client, lambda e: isinstance(e, Message) and e.text == text and e.kind is kind
    )
    assert isinstance(event, Message)
    return event


@pytest.fixture
async def trio(site: Site) -> AsyncIterator[tuple[Client, Client, Client]]:
    site.directory.add_members("bob", "ops/line1", ["dave"])
    profiles = [await site.login(user) for user in ("bob", "carol", "dave")]
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(Client(p, receipt_interval=0.05)) for p in profiles
        ]
        yield clients[0], clients[1], clients[2]


async def test_urgent_notice_tracks_who_has_not_acknowledged(
    trio: tuple[Client, Client, Client],
) -> None:
    bob, carol, dave = trio
    await bob.urgent("ops/line1", "evacuate hall B")
    notice = await said(carol, "evacuate hall B", Kind.URGENT)
    await said(dave, "evacuate hall B", Kind.URGENT)
    await said(bob, "evacuate hall B", Kind.URGENT)
    assert bob.unacknowledged("ops/line1", notice.message_id) == ["carol", "dave"]
    await carol.ack("ops/line1", notice.message_id)
    status = await wait_event(bob, lambda e: isinstance(e, AckStatus))
    assert status == AckStatus("ops/line1", notice.message_id, ("dave",))
    await dave.ack("ops/line1", notice.message_id)
    await dave.ack("ops/line1", notice.message_id)  # twice: still counted once
    status = await wait_event(bob, lambda e: isinstance(e, AckStatus))
    assert status == AckStatus("ops/line1", notice.message_id, ())
    assert bob.unacknowledged("ops/line1", notice.message_id) == []


async def test_edits_and_recalls_reach_everyone_who_has_the_message(
    trio: tuple[Client, Client, Client],
) -> None:
    bob, carol, _ = trio
    await bob.send("ops/line1", "meet at 10")
    await bob.send("ops/line1", "wrong chat, sorry")
    first = await said(carol, "meet at 10")
    second = await said(carol, "wrong chat, sorry")
    mine = await said(bob, "wrong chat, sorry")
    await bob.edit("ops/line1", first.message_id, "meet at 11")
    await bob.recall("ops/line1", mine.message_id)
    await wait_event(carol, lambda e: isinstance(e, Message) and e.kind is Kind.RECALL)
    shown = {m.message_id: m for m in carol.store.history(LINE1)}
    assert shown[first.message_id].body == "meet at 11"
    assert shown[first.message_id].edited_at is not None
    assert shown[second.message_id].recalled
    assert shown[second.message_id].body == ""
    assert carol.store.search("sorry") == []
    with pytest.raises(PermissionDeniedError, match="only the sender"):
        await carol.edit("ops/line1", first.message_id, "hijacked")


async def test_a_recall_after_the_window_is_refused_and_ignored(
    trio: tuple[Client, Client, Client],
) -> None:
    bob, carol, _ = trio
    await bob.send("ops/line1", "old news")
    old = await said(bob, "old news")
    await said(carol, "old news")
    bob.recall_window = 0
    bob._clock = lambda: old.ts + 10  # time passes for bob only
    with pytest.raises(PermissionDeniedError, match="recall window"):
        await bob.recall("ops/line1", old.message_id)
    carol.recall_window = 5
    bob.recall_window = 3600
    await bob.recall("ops/line1", old.message_id)  # bob's clock says 10 s later
    await wait_event(carol, lambda e: isinstance(e, Message) and e.kind is Kind.RECALL)
    kept = carol.store.message(LINE1, old.message_id)
    assert kept is not None
    assert not kept.recalled  # carol's window is 5 s: the late recall is ignored


async def test_reactions_and_receipts_are_counted(trio: tuple[Client, Client, Client]) -> None:
    bob, carol, dave = trio
    await bob.send("ops/line1", "shipment arrived")
    mine = await said(bob, "shipment arrived")
    await said(carol, "shipment arrived")
    await said(dave, "shipment arrived")
    await carol.react("ops/line1", mine.message_id, "👍")
    await dave.react("ops/line1", mine.message_id, "👍")
    await carol.mark_read("ops/line1", [mine.message_id])
    async with asyncio.timeout(10):
        while bob.store.receipts(LINE1, mine.message_id, 1) != ["carol"] or bob.store.reactions(
            LINE1, mine.message_id
        ) != {"👍": ["carol", "dave"]}:
            await wait_event(bob, lambda e: isinstance(e, Message))
    async with asyncio.timeout(10):
        while bob.store.receipts(LINE1, mine.message_id, 0) != ["carol", "dave"]:
            await wait_event(bob, lambda e: isinstance(e, Message) and e.kind is Kind.RECEIPT)


async def test_marking_many_messages_read_sends_every_receipt(
    trio: tuple[Client, Client, Client],
) -> None:
    bob, carol, _ = trio
    await bob.send("ops/line1", "last of a long night shift")
    mine = await said(bob, "last of a long night shift")
    await said(carol, "last of a long night shift")
    # 1,200 messages seen at once: more than one receipt holds, none is dropped.
    backlog = [(mine.message_id[0], i) for i in range(10_000, 11_199)] + [mine.message_id]
    await carol.mark_read("ops/line1", backlog)
    async with asyncio.timeout(10):
        while bob.store.receipts(LINE1, mine.message_id, 1) != ["carol"]:
            await wait_event(bob, lambda e: isinstance(e, Message) and e.kind is Kind.RECEIPT)


async def test_mentions_raise_a_notification(trio: tuple[Client, Client, Client]) -> None:
    bob, carol, dave = trio
    await bob.send("ops/line1", "@carol can you check bay 3?")
    mention = await wait_event(carol, lambda e: isinstance(e, Mention))
    assert isinstance(mention, Mention)
    assert (mention.sender, mention.text) == ("bob", "@carol can you check bay 3?")
    await said(dave, "@carol can you check bay 3?")
    # carol may not mention @all (members cannot); bob, a manager of ops, may.
    await carol.send("ops/line1", "@all lunch is here")
    await bob.send("ops/line1", "@all safety briefing at 2")
    event = await wait_event(dave, lambda e: isinstance(e, Mention))
    assert isinstance(event, Mention)
    assert event.text == "@all safety briefing at 2"
