"""Envelopes, a directory and an archiver on a real broker, for the archive tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshchat.archive import Archiver, ArchiveStats, ArchiveStore, Record, classify
from meshchat.client import Backoff, Transport
from meshchat.directory import Directory, DirectorySnapshot, Role
from meshchat.envelope import Distribution, GroupMessage, Sealed, encode
from meshchat.rpc import Reply, Request, decode_reply
from meshchat.topics import ServiceTopic
from tests.brokers import embedded_broker

__all__ = [
    "DEADLINE",
    "FAST",
    "LINE1",
    "LINE2",
    "ORG",
    "Running",
    "ask",
    "copy",
    "make_directory",
    "message",
    "page_of",
    "record",
    "running_archiver",
    "sealed",
]

ORG = "acme"
LINE1 = "mc/acme/ops/line1"
LINE2 = "mc/acme/ops/line2"
DEADLINE = 20.0
FAST = Backoff(initial=0.01, maximum=0.2, reset_after=60.0)


def message(chain_id: int, index: int, body_len: int = 40) -> bytes:
    """A well-formed group message envelope (random ciphertext and signature)."""
    return encode(GroupMessage(chain_id, index, os.urandom(max(20, body_len)), os.urandom(64)))


def copy(group_path: str, chain_id: int, index: int = 0, sender: str = "a1") -> bytes:
    """A well-formed compliance copy (a distribution) of a chain of `group_path`."""
    import msgpack  # noqa: PLC0415  # only this helper builds statements by hand

    statement = msgpack.packb(
        [group_path, chain_id, index, os.urandom(32), os.urandom(32)], use_bin_type=True
    )
    return encode(Distribution(sender, statement, os.urandom(48), os.urandom(64)))


def sealed(sender: str = "a1") -> bytes:
    """A well-formed sealed pairwise envelope."""
    return encode(Sealed(sender, os.urandom(80), os.urandom(64)))


def record(topic: str, payload: bytes, received_at: float) -> Record:
    """What the archiver keeps of (topic, payload) received at `received_at`."""
    return classify(topic, payload, org=ORG, received_at=received_at)


def make_directory(path: Path) -> Directory:
    """acme: bob (manager) and carol in ops/line1 and ops/line2, erin outside; b1 is bob's."""
    directory = Directory(path)
    directory.init_org(ORG, admin="root", password="root password")
    directory.add_user("root", "bob", dept="ops", role=Role.MANAGER, password="bob password")
    directory.add_user("root", "carol", dept="ops", password="carol password")
    directory.add_user("root", "erin", dept="ops", password="erin password")
    for group in ("ops/line1", "ops/line2"):
        directory.create_group("bob", group)
        directory.add_members("bob", group, ["carol"])
    directory.add_device("bob", "b1", owner="bob", kind="phone")
    return directory


@dataclass
class Running:
    """An archiver on an embedded broker, and the broker's URL."""

    archiver: Archiver
    url: str
    path: Path

    def store(self) -> ArchiveStore:
        """A connection of the test's own to the archive."""
        return ArchiveStore(self.path)

    async def settled(self, stored: int, **counts: int) -> None:
        """Wait until `stored` envelopes are committed (and the other counts reached)."""

        def reached(stats: ArchiveStats) -> bool:
            return stats.stored + stats.duplicates >= stored and all(
                getattr(stats, name) >= value for name, value in counts.items()
            )

        async with asyncio.timeout(DEADLINE):
            await self.archiver.wait_for(reached)


@contextlib.asynccontextmanager
async def running_archiver(
    tmp_path: Path,
    snapshot: DirectorySnapshot | None = None,
    *,
    directory_file: Path | None = None,
    **options: object,
) -> AsyncIterator[Running]:
    """An in-memory embedded broker on a free port with an archiver subscribed to it."""
    path = tmp_path / "archive.db"
    async with embedded_broker() as broker:
        url = broker.listener("mqtt").url
        async with Transport(
            url, client_id=f"svc.archive.{uuid.uuid4().hex[:8]}", backoff=FAST
        ) as transport:
            archiver = Archiver(
                path,
                transport,
                org=ORG,
                snapshot=lambda: snapshot,
                directory_file=directory_file,
                **options,  # type: ignore[arg-type]  # test helper passes options through
            )
            async with asyncio.TaskGroup() as tasks:
                task = tasks.create_task(archiver.run(), name="test.archiver")
                async with asyncio.timeout(DEADLINE):
                    await archiver.ready.wait()
                try:
                    yield Running(archiver, url, path)
                finally:
                    task.cancel()


async def ask(transport: Transport, user: str, request: Request) -> Reply:
    """Send a request to the archive as `user` and wait for its reply (subscribed already)."""
    async with contextlib.aclosing(transport.messages()) as messages:
        await transport.publish(ServiceTopic(ORG, "archive", user).topic, request.encode())
        async with asyncio.timeout(DEADLINE):
            async for incoming in messages:
                reply = decode_reply(incoming.payload)
                if reply.id == request.id:
                    return reply
    msg = "the transport closed before the reply came"
    raise AssertionError(msg)


def page_of(reply: Reply) -> tuple[list[list[Any]], object]:
    """The items and the cursor of a successful history, gap or inbox reply."""
    assert reply.ok, reply.value
    assert isinstance(reply.value, list)
    items, cursor = reply.value
    assert isinstance(items, list)
    return items, cursor
