"""The groups a client follows: what the directory says, and the subscriptions that go with it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable

from meshchat.client._saved import save_groups, saved_groups
from meshchat.client._shared import SERVICE_TIMEOUT, Shared
from meshchat.client.events import GroupsChanged
from meshchat.errors import MeshchatError, NotFoundError, PermissionDeniedError
from meshchat.rpc import Request
from meshchat.topics import GroupTopic, parse_topic

__all__: list[str] = []  # internal: `meshchat.client.core` is the public face


def group_topic(org: str, groups: Iterable[str], user: str, group: str) -> str:
    """The topic of `group` (``dept/name``) if `user` follows it.

    Raises:
        NotFoundError: the user is not in that group.
    """
    known = sorted(groups)
    if group not in known:
        raise NotFoundError(f"{user} is not in {group} (groups: {', '.join(known) or 'none'})")
    dept, name = group.split("/", 1)
    return GroupTopic(org, dept, name).topic


def group_path(topic: str) -> str:
    """The ``dept/name`` of a group topic."""
    parsed = parse_topic(topic)
    assert isinstance(parsed, GroupTopic)
    return parsed.path


class Membership:
    """The groups (``dept/name``) this user is in, kept in step with the directory."""

    def __init__(
        self, shared: Shared, *, request: Callable[[str, Request], Awaitable[object]]
    ) -> None:
        """Start from the groups the store remembers; `request` asks the directory."""
        self._org, self._user = shared.org, shared.user
        self._store, self._transport, self._emit = shared.store, shared.transport, shared.emit
        self._request = request
        self.paths: set[str] = set(saved_groups(shared.store))
        """The groups followed now (a new set each time the directory says what they are)."""

    def topic(self, group: str) -> str:
        """The topic of a group this user is in (see `group_topic`)."""
        return group_topic(self._org, self.paths, self._user, group)

    async def subscribe(self, path: str) -> None:
        """Subscribe to a group's roster and messages."""
        dept, name = path.split("/", 1)
        topic = GroupTopic(self._org, dept, name)
        await asyncio.gather(
            self._transport.subscribe(topic.roster.topic), self._transport.subscribe(topic.topic)
        )

    async def refresh(self) -> None:
        """Ask the directory which groups this user is in, and follow new ones."""
        with contextlib.suppress(MeshchatError, TimeoutError):
            async with asyncio.timeout(SERVICE_TIMEOUT):
                value = await self._request("dir", Request("groups"))
            if isinstance(value, list):
                await self.set_groups({str(g) for g in value})

    async def set_groups(self, fresh: set[str]) -> None:
        """Follow the groups the directory says this user is in now."""
        added = sorted(fresh - self.paths)
        changed = fresh != self.paths
        self.paths = fresh
        save_groups(self._store, self.paths)
        try:
            for path in added:
                await self.follow(path)
        finally:
            # Said once the new groups are subscribed: whoever reacts by sending into one
            # (or by asking who is there) does not race this device's subscription.
            if changed:
                self._emit(GroupsChanged(tuple(sorted(fresh))))

    async def follow(self, path: str) -> None:
        """Subscribe to a group and its roster.

        The broker may learn of a new membership a moment after the directory told us, so a
        refusal is retried briefly.
        """
        for delay in (0.2, 0.5, 1.0, 2.0, 4.0, None):
            try:
                await self.subscribe(path)
            except PermissionDeniedError:
                if delay is None or path not in self.paths:
                    raise
                await asyncio.sleep(delay)
            else:
                return

    async def change(self, op: str, group: str) -> list[str]:
        """Ask the directory to ``join`` or ``leave`` a group; returns the user's groups now.

        Raises:
            MeshchatError: the directory refused, did not answer in time, or answered nonsense.
        """
        try:
            async with asyncio.timeout(SERVICE_TIMEOUT):
                value = await self._request("dir", Request(op, (group,)))
        except TimeoutError as exc:
            raise MeshchatError(
                f"the directory did not answer within {SERVICE_TIMEOUT:g} s; try again"
            ) from exc
        if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
            raise MeshchatError("the directory's reply is malformed")
        await self.set_groups({str(g) for g in value})
        return sorted(self.paths)
