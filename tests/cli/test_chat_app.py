"""`meshchat chat`, driven by Textual's Pilot against a real site server and other clients.

One site server serves the whole module (starting one costs seconds); each test makes its own
groups and logs in its own devices, so tests do not see each other's messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from datetime import UTC

import pytest
import pytest_asyncio
from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import Label, Static

from cli.chatapp import ChatApp
from cli.chatapp.widgets import GroupItem, LinkBanner, LinkStatus, MessageItem, SearchScreen
from meshchat.client import (
    Client,
    ClientEvent,
    Message,
    TransportState,
    Unreadable,
)
from meshchat.directory import Role
from meshchat.e2ee import Kind
from tests.cli.chat_site import ChatSite, FixedClock, converse, open_site
from tests.client.conftest import FAST
from tests.proxy import TcpProxy

pytestmark = pytest.mark.asyncio(loop_scope="module")

USERS = {"bob": Role.MANAGER, "carol": Role.MEMBER, "dave": Role.MEMBER}
SNAPSHOT_USERS = {"lena": Role.MANAGER, "omar": Role.MEMBER}
"""Only the snapshot test uses these, so their group list is the same whatever ran before."""
SIZE = (80, 24)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ChatSite]:
    async with open_site(tmp_path_factory.mktemp("chat"), USERS | SNAPSHOT_USERS) as running:
        yield running


async def until(pilot: Pilot[None], check: Callable[[], bool], what: str) -> None:
    """Let the app run until `check` holds (10 s at most)."""
    try:
        async with asyncio.timeout(10):
            while not check():
                await pilot.pause(0.05)
    except TimeoutError:
        app = pilot.app
        shown = texts(app) if isinstance(app, ChatApp) else []
        raise AssertionError(f"timed out waiting for {what}; the view shows {shown}") from None


async def said(client: Client, text: str, kind: Kind = Kind.TEXT) -> Message:
    """Wait until `client` reads a message with this text and kind."""
    event = await wait_event(
        client, lambda e: isinstance(e, Message) and e.text == text and e.kind is kind
    )
    assert isinstance(event, Message)
    return event


async def wait_event(client: Client, check: Callable[[ClientEvent], bool]) -> ClientEvent:
    async with asyncio.timeout(10):
        async for event in client.events():
            if check(event):
                return event
    raise AssertionError("no such event")


async def joined(client: Client, *groups: str) -> None:
    """Wait until the client follows these groups and has their rosters."""
    async with asyncio.timeout(10):
        while not set(groups) <= set(client.groups):
            await wait_event(client, lambda _: True)
        for group in groups:
            await client.wait_roster(group)


def texts(app: ChatApp) -> list[str]:
    """The message view, entry by entry, as plain text."""
    console = Console(width=60, color_system=None)
    lines = []
    for item in app.view.items():
        with console.capture() as capture:
            console.print(item.body)
        lines.append(" ".join(capture.get().split()))
    return lines


def shows(app: ChatApp, text: str) -> bool:
    return any(text in line for line in texts(app))


def group_item(app: ChatApp, group: str) -> GroupItem:
    item = app.group_list.item(group)
    assert item is not None
    return item


async def type_line(pilot: Pilot[None], line: str) -> None:
    app = pilot.app
    assert isinstance(app, ChatApp)
    app.composer.focus()
    await pilot.press(*line)
    await pilot.press("enter")


@pytest_asyncio.fixture(loop_scope="module")
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as clients:
        yield clients


async def test_switching_groups_shows_each_groups_messages(
    site: ChatSite, stack: AsyncExitStack
) -> None:
    first = site.group("ops/sw-first", "bob", "carol")
    second = site.group("ops/sw-second", "bob", "carol")
    bob = await stack.enter_async_context(Client(await site.login("bob")))
    carol = await stack.enter_async_context(Client(await site.login("carol")))
    await joined(bob, first, second)
    await bob.send(first, "pallets for bay 2")
    await bob.send(second, "night shift starts at 22:00")
    await said(carol, "night shift starts at 22:00")
    app = ChatApp(carol)
    async with app.run_test(size=SIZE) as pilot:
        await app.open_group(first)
        await until(pilot, lambda: shows(app, "pallets for bay 2"), "the first group's message")
        assert not shows(app, "night shift")
        while app.current != second:
            await pilot.press("ctrl+n")
        await until(pilot, lambda: shows(app, "night shift starts at 22:00"), "the second group")
        assert not shows(app, "pallets")
        assert "sw-second" in str(app.query_one("#title", Static).content)
        await pilot.press("ctrl+p")
        assert app.current == first
        await until(pilot, lambda: shows(app, "pallets for bay 2"), "the first group again")


async def test_a_message_typed_in_the_app_reaches_the_other_user_and_back(
    site: ChatSite, stack: AsyncExitStack
) -> None:
    group = site.group("ops/talk", "bob", "carol")
    bob = await stack.enter_async_context(Client(await site.login("bob")))
    carol = await stack.enter_async_context(Client(await site.login("carol")))
    await joined(bob, group)
    await joined(carol, group)
    app = ChatApp(carol)
    async with app.run_test(size=SIZE) as pilot:
        await app.open_group(group)
        await type_line(pilot, "the **dock door** is stuck")
        received = await said(bob, "the **dock door** is stuck")
        assert received.sender == "carol"
        await until(pilot, lambda: shows(app, "carol the dock door is stuck"), "carol's message")
        await bob.reply(group, received.message_id, "on my way")
        await until(pilot, lambda: shows(app, "bob ↪ #1 carol: the dock door is stuck"), "a reply")
        assert shows(app, "on my way")
        assert app.composer.value == ""


async def test_unread_and_mention_counts_rise_in_the_groups_not_open(
    site: ChatSite, stack: AsyncExitStack
) -> None:
    here = site.group("ops/un-here", "bob", "carol")
    there = site.group("ops/un-there", "bob", "carol")
    bob = await stack.enter_async_context(Client(await site.login("bob")))
    carol = await stack.enter_async_context(Client(await site.login("carol")))
    await joined(bob, here, there)
    await joined(carol, here, there)
    app = ChatApp(carol)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await app.open_group(here)
        await bob.send(there, "truck 4 arrived")
        await bob.send(there, "@carol can you sign for it?")
        item = group_item(app, there)
        await until(pilot, lambda: (item.unread, item.mentions) == (2, 1), "two unread, one @")
        assert group_item(app, here).unread == 0
        assert "2" in str(item.query_one(Label).content)
        await until(
            pilot,
            lambda: any("@bob mentioned you" in n.title for n in app._notifications),
            "the mention's notification",
        )
        await pilot.press("ctrl+g")  # the next group with something unread
        assert app.current == there
        assert (item.unread, item.mentions) == (0, 0)
        await until(pilot, lambda: shows(app, "can you sign for it?"), "the messages")


async def test_search_finds_a_message_in_any_group(site: ChatSite, stack: AsyncExitStack) -> None:
    group = site.group("ops/search", "bob", "carol")
    other = site.group("ops/search-other", "bob", "carol")
    bob = await stack.enter_async_context(Client(await site.login("bob")))
    carol = await stack.enter_async_context(Client(await site.login("carol")))
    await joined(bob, group, other)
    await bob.send(group, "the forklift battery is charged")
    await bob.send(other, "lunch at noon")
    await said(carol, "lunch at noon")
    app = ChatApp(carol)
    async with app.run_test(size=SIZE) as pilot:
        await app.open_group(other)
        await type_line(pilot, "/search forklift")
        await until(pilot, lambda: isinstance(app.screen, SearchScreen), "the results")
        results = app.screen
        assert isinstance(results, SearchScreen)
        assert results.texts == ["the forklift battery is charged"]
        await pilot.press("enter")  # open it
        await until(pilot, lambda: app.current == group, "the result's group")
        picked = app.view.highlighted_child
        assert isinstance(picked, MessageItem)
        assert picked.entry.body == "the forklift battery is charged"


async def test_offline_banner_and_the_queued_message_goes_out_on_return(
    site: ChatSite, stack: AsyncExitStack
) -> None:
    group = site.group("ops/offline", "bob", "carol")
    bob = await stack.enter_async_context(Client(await site.login("bob")))
    proxy = await stack.enter_async_context(
        TcpProxy("127.0.0.1", site.server.broker.listener("mqtt").port)
    )
    carol = await stack.enter_async_context(
        Client(await site.login("carol"), broker=proxy.url, backoff=FAST)
    )
    await joined(bob, group)
    await joined(carol, group)
    app = ChatApp(carol)
    async with app.run_test(size=SIZE) as pilot:
        await app.open_group(group)
        banner = app.query_one("#banner", LinkBanner)
        assert not banner.display
        proxy.refuse()
        proxy.cut()
        await until(pilot, lambda: banner.display, "the offline banner")
        await type_line(pilot, "typed in the dead zone")
        await until(pilot, lambda: "1 message queued" in str(banner.content), "the queued count")
        assert "queued" in str(app.query_one("#link", LinkStatus).content)
        assert shows(app, "carol queued typed in the dead zone")
        proxy.accept()
        await said(bob, "typed in the dead zone")
        await until(pilot, lambda: not banner.display, "the banner to go")
        await until(pilot, lambda: app.link[:2] == (TransportState.CONNECTED, 0), "empty outbox")
        await until(pilot, lambda: shows(app, "carol typed in the dead zone"), "no queued mark")


async def test_an_urgent_notice_shows_its_sender_who_has_not_acknowledged(
    site: ChatSite, stack: AsyncExitStack
) -> None:
    group = site.group("ops/urgent", "bob", "carol", "dave")
    bob = await stack.enter_async_context(Client(await site.login("bob")))
    carol = await stack.enter_async_context(Client(await site.login("carol")))
    await joined(bob, group)
    app = ChatApp(bob)
    async with app.run_test(size=SIZE) as pilot:
        await app.open_group(group)
        await type_line(pilot, "/urgent evacuate hall B")
        await until(pilot, lambda: shows(app, "not acknowledged: carol, dave"), "who must ack")
        notice = await said(carol, "evacuate hall B", Kind.URGENT)
        await carol.ack(group, notice.message_id)
        await until(pilot, lambda: shows(app, "not acknowledged: dave"), "carol's ack")
        assert not shows(app, "carol, dave")


async def test_an_urgent_notice_stands_out_until_acknowledged(
    site: ChatSite, stack: AsyncExitStack
) -> None:
    group = site.group("ops/urgent-in", "bob", "carol")
    bob = await stack.enter_async_context(Client(await site.login("bob")))
    carol = await stack.enter_async_context(Client(await site.login("carol")))
    await joined(bob, group)
    await joined(carol, group)
    app = ChatApp(carol)
    async with app.run_test(size=SIZE) as pilot:
        await app.open_group(group)
        await bob.urgent(group, "gas leak near dock 3")
        await until(pilot, lambda: shows(app, "please acknowledge"), "the notice")
        (item,) = [i for i in app.view.items() if i.entry.kind is Kind.URGENT]
        assert item.has_class("-urgent")
        assert group_item(app, group).urgent == 1
        await pilot.press("ctrl+o")
        await until(pilot, lambda: not item.has_class("-urgent"), "the acknowledgement")
        assert group_item(app, group).urgent == 0
        assert shows(app, "you acknowledged")
        await said(bob, "", Kind.ACK)


async def test_edits_and_recalls_change_messages_in_place(
    site: ChatSite, stack: AsyncExitStack
) -> None:
    group = site.group("ops/edits", "bob", "carol")
    bob = await stack.enter_async_context(Client(await site.login("bob")))
    carol = await stack.enter_async_context(Client(await site.login("carol")))
    await joined(bob, group)
    await joined(carol, group)
    app = ChatApp(carol)
    async with app.run_test(size=SIZE) as pilot:
        await app.open_group(group)
        await bob.send(group, "meet at 10")
        await bob.send(group, "wrong chat, sorry")
        first = await said(bob, "meet at 10")
        second = await said(bob, "wrong chat, sorry")
        await until(pilot, lambda: shows(app, "wrong chat"), "both messages")
        await bob.edit(group, first.message_id, "meet at 11")
        await bob.recall(group, second.message_id)
        await until(pilot, lambda: shows(app, "bob (edited) meet at 11"), "the edit")
        await until(pilot, lambda: shows(app, "message recalled"), "the recall")
        assert len(app.view.items()) == 3  # the start of history, and the two, in place
        await type_line(pilot, "ok, see you")
        await until(pilot, lambda: shows(app, "carol ok, see you"), "our message, sealed")
        await type_line(pilot, "/edit see you at 11")
        await said(bob, "see you at 11", Kind.EDIT)
        await until(pilot, lambda: shows(app, "carol (edited) see you at 11"), "our edit")


async def test_unreadable_messages_show_why_and_join_leave_explain(
    site: ChatSite, stack: AsyncExitStack
) -> None:
    group = site.group("ops/notes", "bob", "carol")
    carol = await stack.enter_async_context(Client(await site.login("carol")))
    await joined(carol, group)
    app = ChatApp(carol)
    async with app.run_test(size=SIZE) as pilot:
        await app.open_group(group)
        await app.on_client_event(Unreadable(group, (7, 3), "sent before you joined", "withheld"))
        await until(pilot, lambda: shows(app, "cannot be read: sent before you joined"), "why")
        await type_line(pilot, "/join ops/secret")
        await until(pilot, lambda: shows(app, "meshchat group add ops/secret carol"), "how")
        await type_line(pilot, "/leave")
        await until(pilot, lambda: shows(app, "meshchat group remove ops/notes carol"), "how")
        await type_line(pilot, "/who")
        await until(pilot, lambda: shows(app, "2 members of ops/notes"), "the members")
        await pilot.press("f1")
        assert app.screen.query("#help")
        await pilot.press("escape")
        assert not app.screen.query("#help")


class OwnClientApp(ChatApp):
    """The app opening and closing its client itself, in the event loop it runs in.

    `snap_compare` runs the app in an event loop of its own, so the client must live there.
    Textual calls these handlers before `ChatApp`'s own.
    """

    async def on_mount(self) -> None:
        await self.client.__aenter__()

    async def on_unmount(self) -> None:
        await self.client.__aexit__(None, None, None)


async def test_the_main_screen_layout(site: ChatSite, snap_compare: Callable[..., bool]) -> None:
    """Groups, messages (markdown, a reply, an edit, an urgent notice) and the link at 80x24."""
    clock = FixedClock()
    omar = await converse(site, clock)
    clock.at(45)

    async def settled(pilot: Pilot[None]) -> None:
        app = pilot.app
        assert isinstance(app, OwnClientApp)
        await until(
            pilot,
            lambda: app.link[0] is TransportState.CONNECTED and app.client._events.empty(),
            "the link",
        )

    def in_own_loop() -> bool:
        app = OwnClientApp(Client(omar, clock=clock, send_receipts=False), clock=clock, tz=UTC)
        return snap_compare(app, terminal_size=SIZE, run_before=settled)

    assert await asyncio.to_thread(in_own_loop)
