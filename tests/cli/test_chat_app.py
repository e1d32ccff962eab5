"""`meshchat chat`, driven by Textual's Pilot against a real site server and other clients.

One site server serves the whole module (starting one costs seconds); each test makes its own
groups and logs in its own devices, so tests do not see each other's messages.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from datetime import UTC

import pytest
import pytest_asyncio
from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import Label, Static

from cli.chatapp import COMMANDS, KEYS, ChatApp
from cli.chatapp.view import LOADING, NO_OLDER, START
from cli.chatapp.widgets import GroupItem, LinkBanner, LinkStatus, MessageItem, SearchScreen
from meshchat.archive import ArchiveStats
from meshchat.client import (
    Client,
    ClientEvent,
    Message,
    OrderChanged,
    TransportState,
    Unreadable,
)
from meshchat.device import OrderState
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


async def submit(pilot: Pilot[None], line: str) -> None:
    """Put a line in the composer and press Enter (typing it key by key is slow)."""
    app = pilot.app
    assert isinstance(app, ChatApp)
    app.composer.focus()
    app.composer.value = line
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


async def test_an_urgent_notice_read_before_the_app_starts_is_counted_at_once(
    site: ChatSite, stack: AsyncExitStack
) -> None:
    first = site.group("ops/urgent-early-a", "bob", "carol")  # opens first, not the other
    group = site.group("ops/urgent-early-b", "bob", "carol")
    bob = await stack.enter_async_context(Client(await site.login("bob")))
    profile = await site.login("carol")
    async with Client(profile) as earlier:  # carol's device, before she starts the app
        await joined(bob, group)
        await joined(earlier, first, group)
        await bob.urgent(group, "conveyor 2 stopped, stay clear")
        await said(earlier, "conveyor 2 stopped, stay clear", Kind.URGENT)
    carol = await stack.enter_async_context(Client(profile))
    app = ChatApp(carol)
    async with app.run_test(size=SIZE):
        assert app.current != group
        item = group_item(app, group)
        assert item.urgent == 1
        assert "!1" in str(item.query_one(Label).content)
        assert "! 1 to acknowledge" in str(app.query_one("#link", LinkStatus).content)


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


async def test_unreadable_messages_show_why_and_help_lists_everything(
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
        await submit(pilot, "/help")
        await until(pilot, lambda: bool(app.screen.query("#help")), "the help screen")
        shown = help_text(app)
        for usage, _ in COMMANDS.values():
            assert usage in shown
        for key, _ in KEYS:
            assert key in shown
        await pilot.press("escape")
        assert not app.screen.query("#help")
        await pilot.press("f1")
        assert app.screen.query("#help")
        await pilot.press("escape")
        await submit(pilot, "/dispatch")
        await until(pilot, lambda: notified(app, "usage: /dispatch DEVICE TEXT"), "the usage")
        assert app.composer.value == "/dispatch"  # kept, to be corrected


def help_text(app: ChatApp) -> str:
    console = Console(width=200, color_system=None)
    with console.capture() as capture:
        for static in app.screen.query(Static):
            console.print(static.content)
    return capture.get()


def notified(app: ChatApp, text: str) -> bool:
    return any(text in n.message for n in app._notifications)


def _stored_more(stats: ArchiveStats, *, than: int) -> bool:
    return stats.stored > than


async def archived(site: ChatSite, client: Client, group: str, count: int) -> None:
    """Wait until the archiver holds `count` envelopes of the group (asking it, as members may)."""
    archiver = site.server.archiver
    assert archiver is not None
    async with asyncio.timeout(10):
        while True:
            stored = archiver.stats.stored
            if (await client.fetch_history_page(group, limit=count)).received >= count:
                return
            await archiver.wait_for(functools.partial(_stored_more, than=stored))


async def test_scrolling_back_past_this_device_fetches_older_messages_from_the_archive(
    site: ChatSite, stack: AsyncExitStack
) -> None:
    group = site.group("ops/scroll", "bob", "carol")
    clock = FixedClock()
    bob = await stack.enter_async_context(Client(await site.login("bob"), clock=clock))
    await joined(bob, group)
    for minute in range(1, 6):
        clock.at(minute)
        await bob.send(group, f"old message {minute}")
    await archived(site, bob, group, 5)
    # A new device of carol's: the old messages were never on it.
    carol = await stack.enter_async_context(
        Client(await site.login("carol"), clock=clock, send_receipts=False)
    )
    await joined(carol, group)
    clock.at(10)
    await bob.send(group, "new message")
    await said(carol, "new message")
    app = ChatApp(carol, clock=clock, tz=UTC)
    async with app.run_test(size=SIZE) as pilot:
        await app.open_group(group)
        assert texts(app) == [START, "#1 09:10 bob new message"]
        await app.action_older()  # what pgup does at the top of the view
        assert texts(app)[0] == LOADING  # at once: the archive answers in the background
        old = [f"09:0{m} bob old message {m}" for m in range(1, 6)]
        await until(
            pilot,
            lambda: (
                [line.partition(" ")[2] for line in texts(app)[1:]]
                == [*old, "09:10 bob new message"]
            ),
            "the archive's messages in their places",
        )
        await until(pilot, lambda: texts(app)[0] == NO_OLDER, "the end of the archive")
        await pilot.press("pageup")  # nothing further back: nothing changes, nothing doubles
        await pilot.pause()
        assert len(texts(app)) == 7
        assert texts(app)[0] == NO_OLDER


async def test_join_and_leave_ask_the_directory_and_a_leave_rotates_the_keys(
    site: ChatSite, stack: AsyncExitStack
) -> None:
    team = site.group("ops/jl-team", "bob", "carol")
    site.directory.create_group("root", "ops/jl-open")
    bob = await stack.enter_async_context(Client(await site.login("bob")))
    carol = await stack.enter_async_context(Client(await site.login("carol")))
    await joined(bob, team)
    await joined(carol, team)
    app = ChatApp(carol, page=10)
    async with app.run_test(size=SIZE) as pilot:
        await app.open_group(team)
        await submit(pilot, "/join ops/jl-open")  # carol is a member, not a manager
        await until(pilot, lambda: shows(app, "/join ops/jl-open was refused"), "the refusal")
        assert shows(app, "permission denied: group.manage for department ops")
        assert shows(app, "meshchat group add ops/jl-open carol")
        assert "ops/jl-open" not in app.group_list.groups
        await bob.send(team, "before carol leaves")
        first = await said(bob, "before carol leaves")
        await until(pilot, lambda: shows(app, "before carol leaves"), "bob's message")
        await submit(pilot, "/leave")
        await until(pilot, lambda: team not in app.group_list.groups, "the group to go")
        assert "carol" not in site.directory.group(team).members
        await until(pilot, lambda: shows(app, f"You left {team}"), "the note")
        async with asyncio.timeout(10):
            await bob.wait_roster(team, lambda roster: "carol" not in roster.members)
        await bob.send(team, "after carol left")
        after = await said(bob, "after carol left")
        assert after.message_id[0] != first.message_id[0]  # a new chain carol never got
    manager = ChatApp(bob)
    async with manager.run_test(size=SIZE) as pilot:
        await manager.open_group(team)
        await submit(pilot, "/join ops/jl-open")  # bob manages ops: he may
        await until(pilot, lambda: manager.current == "ops/jl-open", "the joined group")
        assert "bob" in site.directory.group("ops/jl-open").members
        await until(pilot, lambda: shows(manager, "You joined ops/jl-open"), "the note")


async def test_who_shows_the_members_presence_as_it_changes(
    site: ChatSite, stack: AsyncExitStack
) -> None:
    group = site.group("ops/who", "bob", "carol", "dave")
    async with Client(await site.login("dave")):
        pass  # dave was here, and left: his device says offline
    clock = FixedClock()
    carol = await stack.enter_async_context(Client(await site.login("carol"), clock=clock))
    await joined(carol, group)
    app = ChatApp(carol, clock=clock, tz=UTC)
    async with app.run_test(size=SIZE) as pilot:
        await app.open_group(group)
        async with Client(await site.login("bob")) as bob:
            await joined(bob, group)
            await submit(pilot, "/who")
            await until(pilot, lambda: shows(app, "3 members of ops/who"), "the members")
            await until(pilot, lambda: shows(app, "bob (may post announcements): ● online"), "bob")
            assert shows(app, "carol: ● online")
            await until(pilot, lambda: shows(app, "dave: ○ offline"), "dave, offline")
            clock.at(20)
        await until(
            pilot,
            lambda: shows(app, "bob (may post announcements): ○ offline, last seen 09:20"),
            "bob gone",
        )


async def test_react_and_dispatch_from_the_composer(site: ChatSite, stack: AsyncExitStack) -> None:
    group = site.group("ops/react", "bob", "carol")
    bob = await stack.enter_async_context(Client(await site.login("bob")))
    carol = await stack.enter_async_context(Client(await site.login("carol")))
    await joined(bob, group)
    await joined(carol, group)
    app = ChatApp(carol)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await app.open_group(group)
        await bob.send(group, "lunch at noon?")
        await until(pilot, lambda: shows(app, "lunch at noon?"), "bob's message")
        app.composer.value = "/react 👍"
        await pilot.press("enter")
        await until(pilot, lambda: shows(app, "👍 carol"), "the reaction in place")
        reaction = await said(bob, "👍", Kind.REACT)
        assert reaction.sender == "carol"
        await pilot.press("escape", "plus")  # pick the latest message, react to it
        assert app.composer.value == "/react #1 "
        await pilot.press("o", "k", "enter")
        await until(pilot, lambda: shows(app, "noon? ok carol 👍 carol"), "the second reaction")

        await submit(pilot, "/dispatch no-such-van fix the door")
        await until(pilot, lambda: notified(app, "unknown device 'no-such-van'"), "the refusal")
        device = bob.profile.device
        await submit(pilot, f"/dispatch {device} check dock door 4")
        event = await wait_event(bob, lambda e: isinstance(e, OrderChanged))
        assert isinstance(event, OrderChanged)
        order = event.order
        assert (order.text, order.user) == ("check dock door 4", "carol")
        await until(pilot, lambda: shows(app, f"work order {order.order_id} to {device}"), "sent")
        assert shows(app, "sent, waiting for an answer")
        await bob.answer_order(order.order_id, OrderState.ACCEPTED)
        await until(pilot, lambda: shows(app, "check dock door 4 · accepted"), "accepted")
        await bob.answer_order(order.order_id, OrderState.DONE)
        await until(pilot, lambda: shows(app, "check dock door 4 · done"), "done")
        assert len([line for line in texts(app) if "work order" in line]) == 1  # in place


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
