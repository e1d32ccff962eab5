"""Requests to the org's services (directory, archiver) and the replies that answer them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from meshchat.client._shared import Shared
from meshchat.errors import MeshchatError
from meshchat.rpc import PUSH_ID, Request, decode_reply
from meshchat.topics import ServiceTopic

__all__: list[str] = []  # internal: `meshchat.client.core` is the public face


class Services:
    """Pairs each reply with the request waiting for it; hands the directory's pushes on."""

    def __init__(self, shared: Shared, *, on_groups: Callable[[set[str]], None]) -> None:
        """Prepare; `on_groups` takes the groups the directory pushes when they change."""
        self._org, self._user, self._transport = shared.org, shared.user, shared.transport
        self._on_groups = on_groups
        self._replies: dict[bytes, asyncio.Future[object]] = {}

    async def request(self, service: str, request: Request) -> object:
        """Ask a service and wait for its reply (see `Client.request`)."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._replies[request.id] = future
        try:
            if service != "dir":
                await self._transport.subscribe(
                    ServiceTopic(self._org, service, self._user, reply=True).topic
                )
            await self._transport.publish(
                ServiceTopic(self._org, service, self._user).topic, request.encode()
            )
            return await future
        finally:
            self._replies.pop(request.id, None)

    def on_reply(self, payload: bytes) -> None:
        """A message on this user's reply topic: a reply, or the directory's push."""
        with contextlib.suppress(MeshchatError):
            reply = decode_reply(payload)
            if reply.id == PUSH_ID:
                if reply.ok and isinstance(reply.value, list):
                    self._on_groups({str(g) for g in reply.value})
                return
            future = self._replies.get(reply.id)
            if future is not None and not future.done():
                if reply.ok:
                    future.set_result(reply.value)
                else:
                    future.set_exception(MeshchatError(str(reply.value)))
