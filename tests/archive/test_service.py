"""The archiver on a real broker: stored once, bad input dropped, history for members only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshchat.archive import Archiver, ArchiveStats, ArchiveStore
from meshchat.broker import BrokerSettings
from meshchat.client import Transport
from meshchat.datadir import DataDir
from meshchat.directory import Directory, DirectorySnapshot
from meshchat.envelope import EnvelopeType
from meshchat.rpc import Request
from meshchat.server import SiteServer
from meshchat.topics import ServiceTopic
from tests.archive.helpers import (
    DEADLINE,
    FAST,
    LINE1,
    LINE2,
    ORG,
    ask,
    copy,
    make_directory,
    message,
    page_of,
    record,
    running_archiver,
)
from tests.brokers import Mosquitto


@pytest.fixture
def snapshot(tmp_path: Path) -> Iterator[DirectorySnapshot]:
    with make_directory(tmp_path / "directory.db") as directory:
        yield directory.snapshot()


def client(url: str, user: str, **options: object) -> Transport:
    return Transport(url, client_id=f"{user}.test", clean_session=True, backoff=FAST, **options)  # type: ignore[arg-type]  # options pass through


async def test_every_envelope_is_stored_once_even_when_sent_again(tmp_path: Path) -> None:
    payloads = [message(1, i) for i in range(200)]
    async with running_archiver(tmp_path) as running, client(running.url, "bob") as bob:
        for payload in payloads:
            bob.publish_nowait(LINE1, payload)
        for payload in payloads[:50]:  # a publisher that never saw the PUBACK sends again
            bob.publish_nowait(LINE1, payload)
        await bob.publish(LINE1, payloads[0])
        await running.settled(251)
        stats = running.archiver.stats
        with running.store() as store:
            stored = [e.payload for e in store.group_envelopes("ops/line1")]
    assert (stats.stored, stats.duplicates) == (200, 51)
    assert stored == payloads


async def test_malformed_and_oversize_envelopes_are_counted_logged_and_block_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = os.urandom(24)
    bad = [secret, b"", b"\x01" + secret * 10_000, message(1, 0)[:-1], copy("ops/line2", 1)]
    good = [message(2, i) for i in range(20)]
    with caplog.at_level(logging.WARNING, logger="meshchat.archive"):
        async with running_archiver(tmp_path) as running, client(running.url, "bob") as bob:
            for payload in bad:
                bob.publish_nowait(LINE1, payload)
            for payload in good:
                bob.publish_nowait(LINE1, payload)
            bob.publish_nowait(f"mc/{ORG}/_p/b1", b"\x01online")  # not archived: ignored
            await bob.publish(f"mc/{ORG}/_t/b1/gps", b"{}")  # not even subscribed
            await running.settled(len(good), malformed=len(bad), ignored=1)
            stats = running.archiver.stats
            with running.store() as store:
                assert [e.payload for e in store.group_envelopes("ops/line1")] == good
    assert (stats.stored, stats.malformed, stats.ignored) == (20, 5, 1)
    lines = [r.getMessage() for r in caplog.records if "dropped a malformed" in r.getMessage()]
    assert len(lines) == 5
    assert all(LINE1 in line for line in lines)
    assert not [line for line in lines if secret.hex()[:16] in line or repr(secret)[2:20] in line]


async def test_history_and_gap_requests_are_answered_to_members_only(
    tmp_path: Path, snapshot: DirectorySnapshot
) -> None:
    # Chain 5 has indices 0..59 but for the ones a device missed; chain 6 is another sender's.
    sent = {i: message(5, i) for i in range(60)}
    async with running_archiver(tmp_path, snapshot) as running:
        async with client(running.url, "bob") as bob:
            for payload in sent.values():
                bob.publish_nowait(LINE1, payload)
            bob.publish_nowait(LINE1, copy("ops/line1", 5))
            for i in range(10):
                bob.publish_nowait(LINE1, message(6, i))
            await bob.publish(LINE2, message(7, 0))
            await running.settled(72)
            await bob.subscribe(ServiceTopic(ORG, "archive", "bob", reply=True).topic)
            history = await ask(bob, "bob", Request("history", ("ops/line1", None, None, None, 25)))
            items, cursor = page_of(history)
            assert [(item[3], item[4]) for item in items] == [(5, i) for i in range(25)]
            assert items[0][6] == sent[0]
            assert all(item[2] == int(EnvelopeType.GROUP) for item in items)  # no copies
            nxt = await ask(bob, "bob", Request("history", ("ops/line1", None, None, cursor, 100)))
            rest, end = page_of(nxt)
            assert (len(rest), end) == (45, None)
            gap = await ask(bob, "bob", Request("gap", ("ops/line1", 5, 17, 23)))
            gap_items, gap_end = page_of(gap)
            assert [item[6] for item in gap_items] == [sent[i] for i in range(17, 24)]
            assert gap_end is None
            for bad, says in [
                (Request("history", ("ops/nowhere",)), "no group ops/nowhere"),
                (Request("history", ("ops/line1", "yesterday")), "since must be unix seconds"),
                (Request("gap", ("ops/line1", 5, 0, 5000)), "a gap spans 1 to 1000"),
                (Request("shred", ("ops/line1",)), "does not know 'shred'"),
                (Request("inbox", ("c1",)), "c1 is not an active device of bob"),
            ]:
                refused = await ask(bob, "bob", bad)
                assert (refused.ok, says in str(refused.value)) == (False, True), refused
            # A request that is not even a request gets no answer; the next one does.
            bob.publish_nowait(ServiceTopic(ORG, "archive", "bob").topic, b"\x00garbage")
            assert (await ask(bob, "bob", Request("history", ("ops/line2",)))).ok
        async with client(running.url, "erin") as erin:
            await erin.subscribe(ServiceTopic(ORG, "archive", "erin", reply=True).topic)
            refused = await ask(erin, "erin", Request("history", ("ops/line1",)))
            assert not refused.ok
            assert refused.value == "erin is not a member of ops/line1"
        stats = running.archiver.stats
    assert (stats.dropped_requests, stats.refused) == (1, 6)


async def test_without_a_directory_every_request_is_refused(tmp_path: Path) -> None:
    async with running_archiver(tmp_path) as running, client(running.url, "bob") as bob:
        await bob.subscribe(ServiceTopic(ORG, "archive", "bob", reply=True).topic)
        reply = await ask(bob, "bob", Request("history", ("ops/line1",)))
        assert running.archiver.stats.refused == 1
    assert (reply.ok, "no directory" in str(reply.value)) == (False, True)


async def test_a_retention_pass_runs_at_start_and_each_is_audited(tmp_path: Path) -> None:
    directory_file = tmp_path / "directory.db"
    with make_directory(directory_file) as directory:
        directory.set_policy("root", "ops/line1", retention_days=1)
        snapshot = directory.snapshot()
    with ArchiveStore(tmp_path / "archive.db") as store:
        store.insert([record(LINE1, message(1, i), 1000.0) for i in range(5)])
        store.insert([record(LINE2, message(2, i), 1000.0) for i in range(3)])
    async with running_archiver(tmp_path, snapshot, directory_file=directory_file) as running:
        async with asyncio.timeout(DEADLINE):
            await running.archiver.wait_for(lambda stats: stats.retention_runs == 1)
        again = await running.archiver.retention_pass()
        with running.store() as store:
            left = store.count()
    with Directory(directory_file) as directory:
        runs = [e for e in directory.audit_entries() if e.action == "archive.retention"]
    assert left == 3  # line1 keeps 1 day; line2 keeps everything
    assert [run.details_dict["deleted"] for run in runs] == [{"ops/line1": 5}, {}]
    assert runs[0].details_dict["kept"] == ["ops/line2"]
    assert again is not None
    assert again.total_deleted == 0


# -- inside `meshchat up` ------------------------------------------------------------------------


async def test_the_site_servers_archiver_answers_members_and_follows_removals(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    make_directory(data / "directory.db").close()
    payloads = [message(3, i) for i in range(5)]
    async with SiteServer(DataDir(data), BrokerSettings(port=0)) as server:
        assert server.archiver is not None
        url = server.broker.listener("mqtt").url
        async with (
            client(url, "bob", username="bob", password="bob password") as bob,
            client(url, "carol", username="carol", password="carol password") as carol,
            client(url, "erin", username="erin", password="erin password") as erin,
        ):
            for payload in payloads:
                await bob.publish(LINE1, payload)
            async with asyncio.timeout(DEADLINE):
                await server.archiver.wait_for(lambda s: s.stored >= len(payloads))
            for user, transport in (("carol", carol), ("erin", erin)):
                await transport.subscribe(ServiceTopic(ORG, "archive", user, reply=True).topic)
            reply = await ask(carol, "carol", Request("history", ("ops/line1",)))
            assert [item[6] for item in page_of(reply)[0]] == payloads
            assert not (await ask(erin, "erin", Request("history", ("ops/line1",)))).ok
            # The broker's ACL lets erin ask only in her own name.
            erin.publish_nowait(ServiceTopic(ORG, "archive", "carol").topic, b"x")
            with Directory(data / "directory.db") as directory:
                directory.remove_members("bob", "ops/line1", ["carol"])
            assert server.watcher is not None
            async with asyncio.timeout(DEADLINE):
                await server.watcher.wait_for(
                    lambda policy: "carol" not in policy.snapshot.groups["ops", "line1"].members
                )
            after = await ask(carol, "carol", Request("history", ("ops/line1",)))
            assert (after.ok, "not a member" in str(after.value)) == (False, True)
    with ArchiveStore(data / "archive.db") as store:
        assert store.count(group_path="ops/line1") == len(payloads)


# -- scale-out: several archivers on an external broker --------------------------------------------


async def test_archivers_on_a_shared_subscription_split_the_load_each_envelope_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    payloads = [message(1, i) for i in range(200)]
    archivers: list[Archiver] = []
    runners: list[asyncio.Task[None]] = []
    async with asyncio.TaskGroup() as tasks, contextlib.AsyncExitStack() as stack:
        for name in ("one", "two"):
            link = await stack.enter_async_context(
                Transport(url, client_id=f"svc.archive.{name}", backoff=FAST)
            )
            archiver = Archiver(tmp_path / f"{name}.db", link, org=ORG, share="archivers")
            assert archiver.filters[0] == f"$share/archivers/mc/{ORG}/+/+"
            archivers.append(archiver)
            runners.append(tasks.create_task(archiver.run(), name=f"test.archiver.{name}"))
            async with asyncio.timeout(DEADLINE):
                await archiver.ready.wait()
        async with client(url, "bob") as bob:
            for payload in payloads:
                bob.publish_nowait(LINE1, payload)
            await bob.publish(LINE1, payloads[0])  # sent again: whichever archiver gets it
        async with asyncio.timeout(DEADLINE):
            while sum(a.stats.stored for a in archivers) < len(payloads):
                await _any_stores_more(archivers)
        for runner in runners:
            runner.cancel()
    stored: list[bytes] = []
    counts = []
    for name in ("one", "two"):
        with ArchiveStore(tmp_path / f"{name}.db") as store:
            counts.append(store.count())
            stored += [e.payload for e in store.group_envelopes("ops/line1")]
    # Each envelope is in one of the archives (a resend may land in the other one: the
    # archives are merged when read, by their unique payload digest).
    assert set(stored) == set(payloads)
    assert len(stored) - len(set(stored)) <= 1
    assert all(count > 0 for count in counts)  # both took a share


async def _any_stores_more(archivers: list[Archiver]) -> None:
    """Return once any of the archivers committed another envelope."""

    def more_than(had: int) -> Callable[[ArchiveStats], bool]:
        return lambda stats: stats.stored > had

    waits = [
        asyncio.create_task(
            archiver.wait_for(more_than(archiver.stats.stored)), name="test.archiver.wait"
        )
        for archiver in archivers
    ]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
