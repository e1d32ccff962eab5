"""History from the archiver: a group's older messages, and a new device's first inbox."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from meshchat.client._receiving import Receiver
from meshchat.client._saved import INBOX_SYNCED_KEY
from meshchat.client._shared import SERVICE_TIMEOUT, Shared
from meshchat.client.events import HistoryPage
from meshchat.errors import MeshchatError
from meshchat.rpc import Request

__all__: list[str] = []  # internal: `meshchat.client.core` is the public face

logger = logging.getLogger(__name__)

HISTORY_PAGE: Final = 200
MAX_HISTORY_PAGES: Final = 50


class History:
    """Pages through the archiver's copy and feeds it to the session like live messages."""

    def __init__(
        self,
        shared: Shared,
        *,
        receiver: Receiver,
        request: Callable[[str, Request], Awaitable[object]],
        topic: Callable[[str], str],
    ) -> None:
        """Prepare; `topic` names a group's topic (and refuses a group the user is not in)."""
        self._device, self._session, self._store = shared.device, shared.session, shared.store
        self._receiver = receiver
        self._request = request
        self._topic = topic

    async def fetch(
        self, group: str, *, since: float | None, until: float | None, max_pages: int
    ) -> int:
        """Fetch a group's older messages page by page (see `Client.fetch_history`)."""
        self._topic(group)
        before = self._receiver.kept
        cursor: object = None
        for _ in range(max_pages):
            page = await self.fetch_page(group, since=since, until=until, cursor=cursor)
            cursor = page.cursor
            if cursor is None:
                break
        return self._receiver.kept - before

    async def fetch_page(
        self,
        group: str,
        *,
        since: float | None = None,
        until: float | None = None,
        cursor: object = None,
        limit: int = HISTORY_PAGE,
        newest_first: bool = False,
    ) -> HistoryPage:
        """Fetch one page of a group's history (see `Client.fetch_history_page`)."""
        topic = self._topic(group)
        before = self._receiver.kept
        args = (group, since, until, cursor, limit, newest_first)
        value = await self._request("archive", Request("history", args))
        match value:
            case [list(items), next_cursor]:
                pass
            case _:
                raise MeshchatError("the archiver's history reply is malformed")
        unseen = 0
        ids = [
            (item[-4], item[-3])
            for item in items
            if isinstance(item, list) and len(item) >= 4 and type(item[-4]) is type(item[-3]) is int
        ]
        stored = self._store.messages_by_id(topic, ids) if ids else {}
        for item in reversed(items) if newest_first else items:
            match item:
                case [*_, int(chain_id), int(index), _, bytes(payload)]:
                    if (chain_id, index) in stored:
                        continue  # read before: its chain may even be forgotten by now
                    unseen += 1
                    self._receiver.apply(
                        self._session.on_group_message(topic, payload, history=True)
                    )
        return HistoryPage(len(items), unseen, self._receiver.kept - before, next_cursor)

    async def sync_inbox(self) -> None:
        """Once, on a new device: read what reached its inbox before its session existed.

        Senders share their chains with a new device as soon as its key record appears, which
        can be a moment before the device's persistent session subscribes to its inbox; the
        archiver keeps inboxes, so nothing sent in that moment is lost.
        """
        cursor: object = None
        try:
            for _ in range(MAX_HISTORY_PAGES):
                async with asyncio.timeout(SERVICE_TIMEOUT):
                    value = await self._request(
                        "archive", Request("inbox", (self._device, None, cursor))
                    )
                match value:
                    case [list(items), next_cursor]:
                        pass
                    case _:
                        return
                for item in items:
                    payload = item[-1] if isinstance(item, list) and item else None
                    if isinstance(payload, bytes):
                        self._receiver.apply(self._session.on_inbox(payload))
                cursor = next_cursor
                if cursor is None:
                    break
        except (MeshchatError, TimeoutError) as exc:
            logger.info("no inbox history from the archiver (%s); relying on the session", exc)
            return
        self._store.put(INBOX_SYNCED_KEY, b"1")
