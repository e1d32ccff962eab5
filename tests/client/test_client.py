"""The E2EE client against a real site server: login, send, receive, restart, flaky links."""

from __future__ import annotations

import asyncio

import pytest

from meshchat.client.core import Client, GroupsChanged, Message
from meshchat.client.login import LoginRefusedError, login
from meshchat.client.store import ClientStore
from meshchat.e2ee import TrustError
from meshchat.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from tests.client.conftest import FAST, PASSWORDS, Site
from tests.proxy import TcpProxy


async def next_message(client: Client, *, text: str | None = None) -> Message:
    async with asyncio.timeout(10):
        async for event in client.events():
            if isinstance(event, Message) and (text is None or event.text == text):
                return event
    raise AssertionError("no message")


async def test_two_users_talk_end_to_end(site: Site) -> None:
    bob_profile = await site.login("bob")
    carol_profile = await site.login("carol")
    async with Client(bob_profile) as bob, Client(carol_profile) as carol:
        assert bob.groups == ["ops/line1"]
        await bob.send("ops/line1", "forklift 3 is down")
        received = await next_message(carol, text="forklift 3 is down")
        assert (received.sender, received.device, received.group) == (
            "bob",
            "bob-laptop",
            "ops/line1",
        )
        await carol.send("ops/line1", "on my way")
        await next_message(bob, text="on my way")
        async with asyncio.timeout(10):
            await bob.flush()
        assert bob.queued == 0
        assert [m.body for m in carol.store.history("mc/acme/ops/line1")] == [
            "forklift 3 is down",
            "on my way",
        ]


async def test_the_broker_never_sees_the_text(site: Site) -> None:
    bob_profile = await site.login("bob")
    async with Client(bob_profile) as bob:
        await bob.send("ops/line1", "the secret recipe")
        async with asyncio.timeout(10):
            await bob.flush()
    state = (site.server.data.path / "broker.db").read_bytes()
    assert b"secret recipe" not in state


async def test_a_message_sent_while_offline_goes_out_on_reconnect(site: Site) -> None:
    host, port = "127.0.0.1", site.server.broker.listener("mqtt").port
    async with TcpProxy(host, port) as proxy:
        bob_profile = await site.login("bob")
        carol_profile = await site.login("carol")
        async with (
            Client(bob_profile, broker=proxy.url, backoff=FAST) as bob,
            Client(carol_profile) as carol,
        ):
            await bob.send("ops/line1", "first")
            await next_message(carol, text="first")
            proxy.refuse()
            proxy.cut()
            await bob.send("ops/line1", "typed in the dead zone")
            assert bob.queued >= 1
            proxy.accept()
            await next_message(carol, text="typed in the dead zone")


async def test_nothing_queued_is_lost_across_a_restart(site: Site) -> None:
    bob_profile = await site.login("bob")
    carol_profile = await site.login("carol")
    # bob types while the broker is unreachable, then quits.
    async with Client(bob_profile, broker="mqtt://127.0.0.1:9", backoff=FAST) as bob:
        await bob.send("ops/line1", "written on the train")
        assert bob.queued == 1
    async with Client(carol_profile) as carol, Client(bob_profile) as bob:
        await next_message(carol, text="written on the train")
        async with asyncio.timeout(10):
            await bob.flush()


async def test_a_late_joiner_reads_new_messages_and_is_told_about_old_ones(site: Site) -> None:
    bob_profile = await site.login("bob")
    dave_profile = await site.login("dave")
    async with Client(bob_profile) as bob:
        await bob.send("ops/line1", "before dave")
        async with asyncio.timeout(10):
            await bob.flush()
        site.directory.add_members("bob", "ops/line1", ["dave"])
        async with Client(dave_profile) as dave:
            await wait_for_group(dave, "ops/line1")
            await bob.send("ops/line1", "welcome dave")
            received = await next_message(dave)
            assert received.text == "welcome dave"


async def wait_for_group(client: Client, group: str) -> None:
    if group in client.groups:
        return
    async with asyncio.timeout(10):
        async for event in client.events():
            if isinstance(event, GroupsChanged) and group in event.groups:
                return


async def test_bad_logins_and_groups_get_clear_errors(site: Site) -> None:
    with pytest.raises(AuthenticationError):
        await login(
            site.clients / "x",
            broker=site.url,
            org="acme",
            user="bob",
            password="nope",
            device="b2",
        )
    with pytest.raises(LoginRefusedError, match="taken"):
        await site.login("carol", device="bob")
    with pytest.raises(TrustError, match="fingerprint"):
        await login(
            site.clients / "y",
            broker=site.url,
            org="acme",
            user="carol",
            password=PASSWORDS["carol"],
            device="carol-phone",
            fingerprint="0000-0000-0000-0000-0000",
        )
    profile = await site.login("carol")
    async with Client(profile) as carol:
        with pytest.raises(NotFoundError, match="not in ops/line2"):
            await carol.send("ops/line2", "hello?")


async def test_posting_in_an_announcement_channel_needs_the_role(site: Site) -> None:
    site.directory.create_group("bob", "ops/news", announcement=True)
    site.directory.add_members("bob", "ops/news", ["carol"])
    carol_profile = await site.login("carol")
    bob_profile = await site.login("bob")
    async with Client(carol_profile) as carol, Client(bob_profile) as bob:
        async with asyncio.timeout(10):
            await carol.wait_roster("ops/news")
        with pytest.raises(PermissionDeniedError, match="announcement channel: only bob"):
            await carol.send("ops/news", "can I post here?")
        assert carol.queued == 0  # refused at once, not queued forever
        await bob.send("ops/news", "canteen closed today")
        await next_message(carol, text="canteen closed today")


async def test_a_removed_member_stops_receiving_readable_messages(site: Site) -> None:
    site.directory.add_members("bob", "ops/line1", ["dave"])
    profiles = [await site.login(user) for user in ("bob", "carol", "dave")]
    async with Client(profiles[0]) as bob, Client(profiles[1]) as carol:
        async with Client(profiles[2]) as dave:
            await bob.send("ops/line1", "before")
            await next_message(carol, text="before")
            await next_message(dave, text="before")
            site.directory.remove_members("bob", "ops/line1", ["carol"])
            async with asyncio.timeout(10):
                await bob.wait_roster("ops/line1", lambda r: "carol" not in r.members)
            await bob.send("ops/line1", "after")
            await next_message(dave, text="after")
        assert [m.body for m in carol.store.history("mc/acme/ops/line1")] == ["before"]


async def test_the_session_is_saved_in_parts_and_an_old_single_blob_is_moved_over(
    site: Site,
) -> None:
    bob_profile = await site.login("bob")
    carol_profile = await site.login("carol")
    # No receipts: carol's own replies would touch her own chain too.
    async with (
        Client(bob_profile, send_receipts=False) as bob,
        Client(carol_profile, send_receipts=False) as carol,
    ):
        await bob.send("ops/line1", "first")
        await next_message(carol, text="first")
        # One message on a chain carol holds already: she saves the core and that chain.
        written: list[str] = []
        carol.store.db.conn.set_trace_callback(written.append)
        await bob.send("ops/line1", "second")
        await next_message(carol, text="second")
        carol.store.db.conn.set_trace_callback(None)
        saved = [s for s in written if "INTO state (key, value)" in s]
        assert saved, written
        assert {key for s in saved for key in _state_keys(s)} == {
            "session/core",
            f"session/chain:mc/acme/ops/line1:{_chain_of(carol)}",
        }
        whole = carol.session.to_bytes()
    # A store written by an older meshchat holds the session as one blob: it is moved over.
    with ClientStore(carol_profile.store_path) as store, store.transaction():
        for key in store.get_prefixed("session/"):
            store.delete(f"session/{key}")
        store.put("session", whole)
    async with Client(carol_profile) as carol:
        assert carol.session.to_bytes() == whole
        assert carol.store.get("session") is None
        assert "core" in carol.store.get_prefixed("session/")
        async with Client(bob_profile) as bob:
            await bob.send("ops/line1", "third")
            await next_message(carol, text="third")
    async with Client(carol_profile) as carol:
        assert [m.body for m in carol.store.history("mc/acme/ops/line1")] == [
            "first",
            "second",
            "third",
        ]


def _state_keys(statement: str) -> list[str]:
    """The keys an expanded ``INSERT INTO state`` statement writes."""
    return [part.split("'")[1] for part in statement.split("VALUES (")[1:]]


def _chain_of(client: Client) -> int:
    (message,) = [m for m in client.store.history("mc/acme/ops/line1") if m.body == "second"]
    return message.message_id[0]
