"""Killing a sending client mid-burst loses nothing and repeats nothing."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
from pathlib import Path

from meshchat.client.core import Client, Message
from meshchat.e2ee import Kind
from tests.client.conftest import Site

SENDER = """
import asyncio, sys
from pathlib import Path
from meshchat.client import Client, open_profile

async def main(data: str, count: int) -> None:
    async with Client(open_profile(Path(data), "bob")) as client:
        for number in range(count):
            await client.send("ops/line1", f"burst {number}")
        print("queued", flush=True)  # every message is in the outbox now
        async with asyncio.timeout(60):
            await client.flush()


asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def outbox_rows(store: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        try:
            return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
        except sqlite3.OperationalError:
            return -1  # not created yet


async def test_killing_the_sender_mid_burst_loses_and_repeats_nothing(site: Site) -> None:
    bob_profile = await site.login("bob")
    carol_profile = await site.login("carol")
    count = 30
    async with Client(carol_profile) as carol:
        sender = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SENDER,
            str(site.clients / "bob"),
            str(count),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert sender.stdout is not None
        # Kill it -9 once the broker acknowledged part of the burst, not all of it. `send`
        # commits one outbox row per message, so before the sender says the whole burst is
        # queued, fewer than `count` rows only means it is still queueing (a kill then loses
        # messages that were never sent, which proves nothing); after it, acknowledgements.
        async with asyncio.timeout(60):
            assert await sender.stdout.readline() == b"queued\n"
            while not 0 < outbox_rows(bob_profile.store_path) < count:
                assert sender.returncode is None, "the sender ended before it was killed"
                await asyncio.sleep(0.01)  # an external process: nothing to await but its file
        sender.kill()
        await sender.wait()
        left = outbox_rows(bob_profile.store_path)
        assert left > 0
        again = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SENDER,
            str(site.clients / "bob"),
            "0",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, errors = await asyncio.wait_for(again.communicate(), 120)
        assert again.returncode == 0, errors.decode()
        assert outbox_rows(bob_profile.store_path) == 0
        seen: list[str] = []
        async with asyncio.timeout(30):
            async for event in carol.events():
                if isinstance(event, Message) and event.text.startswith("burst"):
                    seen.append(event.text)
                    if len(set(seen)) == count:
                        break
        # Carol's own delivery receipts are in the history too: only the texts count here.
        history = [m.body for m in carol.store.history("mc/acme/ops/line1") if m.kind == Kind.TEXT]
    assert sorted(history) == sorted(f"burst {n}" for n in range(count))  # each exactly once
    assert sorted(seen) == sorted(history)
