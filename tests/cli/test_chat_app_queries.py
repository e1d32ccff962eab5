"""The chat app's reads of the local store stay few however long a group's history grows.

They are counted on the store's own SQLite connection, with a real site server and real clients.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack

import pytest
import pytest_asyncio

from cli.chatapp import ChatApp
from meshchat.client import Client, LinkChanged
from meshchat.directory import Role
from meshchat.e2ee import Kind
from tests.cli.chat_site import ChatSite, open_site
from tests.cli.test_chat_app import SIZE, joined, said, shows, type_line, until

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ChatSite]:
    users = {"bob": Role.MANAGER, "carol": Role.MEMBER}
    async with open_site(tmp_path_factory.mktemp("queries"), users) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as clients:
        yield clients


@contextlib.contextmanager
def reads(client: Client) -> Iterator[list[str]]:
    """The SELECT statements run on the client's store inside the block."""
    statements: list[str] = []
    conn = client.store.db.conn
    conn.set_trace_callback(statements.append)
    try:
        yield statements
    finally:
        conn.set_trace_callback(None)


def selects(statements: list[str]) -> list[str]:
    return [s for s in statements if s.lstrip().upper().startswith("SELECT")]


async def test_link_events_read_no_outbox_once_our_messages_went_out(
    site: ChatSite, stack: AsyncExitStack
) -> None:
    group = site.group("ops/q-outbox", "bob", "carol")
    bob = await stack.enter_async_context(Client(await site.login("bob")))
    carol = await stack.enter_async_context(Client(await site.login("carol")))
    await joined(bob, group)
    await joined(carol, group)
    app = ChatApp(carol)
    async with app.run_test(size=SIZE) as pilot:
        await app.open_group(group)
        for n in range(10):
            await bob.send(group, f"pick list {n} is ready")
        await until(pilot, lambda: shows(app, "pick list 9 is ready"), "bob's messages")
        await type_line(pilot, "on my way")
        await said(bob, "on my way")
        await until(pilot, lambda: shows(app, "carol on my way"), "ours, no longer queued")
        event = LinkChanged(carol.state, carol.queued)
        with reads(carol) as statements:
            await app.on_client_event(event)  # nothing in it waits: only this runs meanwhile
        assert [s for s in statements if "outbox" in s] == []


async def busy(bob: Client, carol: Client, group: str, rounds: int) -> None:
    """Rounds of a message, a reply to it, a reaction to it and an urgent notice, all read."""
    for n in range(rounds):
        await bob.send(group, f"note {n}")
        note = await said(bob, f"note {n}")
        await bob.reply(group, note.message_id, f"answer {n}")
        await bob.react(group, note.message_id, "👍")
        await bob.urgent(group, f"alarm {n}")
    await said(carol, f"alarm {rounds - 1}", Kind.URGENT)


async def test_opening_a_group_reads_as_much_for_many_messages_as_for_a_few(
    site: ChatSite, stack: AsyncExitStack
) -> None:
    few = site.group("ops/q-few", "bob", "carol")
    many = site.group("ops/q-many", "bob", "carol")
    bob = await stack.enter_async_context(Client(await site.login("bob")))
    carol = await stack.enter_async_context(Client(await site.login("carol"), send_receipts=False))
    await joined(bob, few, many)
    await joined(carol, few, many)
    await busy(bob, carol, few, 1)
    await busy(bob, carol, many, 8)
    app = ChatApp(carol)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, carol._events.empty, "the app to catch up with the client")
        await pilot.pause()
        for group, count in ((few, 1), (many, 5)):  # messages this device could not read
            for index in range(count):
                carol.store.add_notice(
                    app._topic(group), (1, index), reason="sent before you joined", code="withheld"
                )
        with reads(carol) as opening_few:
            await app.open_group(few)
        with reads(carol) as opening_many:
            await app.open_group(many)
        assert len(app.view.items()) == 1 + 8 * 3 + 5  # the start, 24 messages, 5 unreadable
        assert shows(app, "cannot be read: sent before you joined")
        assert shows(app, "↪ #")
        assert shows(app, "bob: note 7 answer 7")
        assert shows(app, "note 7 👍 bob")
        assert shows(app, "bob URGENT alarm 7 please acknowledge")
    assert len(selects(opening_many)) == len(selects(opening_few))
