"""The directory service: answers clients on `_s/dir`; publishes signed rosters and key records.

Clients on other machines never see the directory file. This service, inside ``meshchat up``,
is how they learn what it holds:

- it publishes, retained, the signed roster of every group on ``.../_r``, the signed key
  record of every user on ``_k/{user}`` and each user's groups on ``_s/dir/{user}/reply``,
  and publishes again whatever changed whenever the
  directory changes (an admin command, an HR import, a registration) and before rosters expire;
  an emptied key record tells every sender that a revoked user's devices are gone;
- it answers requests on ``_s/dir/{user}`` (the broker lets each user publish under their own
  name only) on ``_s/dir/{user}/reply``:

  ``register [device, signing key, box key]``
      creates a device for the user with its public keys and returns the org's trust bundle,
      the device's broker token sealed to the device's box key (only that device can read it),
      and the user's groups. Used by ``meshchat login``.
  ``groups []``
      the user's groups (``dept/name`` paths).
  ``trust []``
      the org's trust bundle.
  ``join [group]``
      adds the user to a group, with the right ``meshchat group add`` needs for it (admins,
      and managers of the group's department); returns the user's groups.
  ``leave [group]``
      takes the user out of a group (anyone may leave, except a site channel, which the
      geofence keeps); the group's keys rotate before its next message. Returns the groups.

  Joins and leaves go through the same directory calls as ``meshchat group add|remove``: the
  audit log records them, the roster is re-signed and published, and the broker's policy
  learns of the change before the reply goes out.

`DirectoryResponder` holds the logic and runs its SQLite and crypto work synchronously;
`DirectoryService` drives it from a `Transport` on a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

import nacl.public

from meshchat.directory.model import Role, UserStatus
from meshchat.directory.policy import DIRECTORY_SERVICE
from meshchat.directory.signing import OrgKeys, RosterSigner
from meshchat.directory.store import Directory, parse_group_path
from meshchat.envelope import encode
from meshchat.errors import (
    EnvelopeError,
    MeshchatError,
    NotFoundError,
    PermissionDeniedError,
    TopicError,
)
from meshchat.rpc import PUSH_ID, Reply, Request, decode_request
from meshchat.topics import (
    SITES_DEPARTMENT,
    GroupTopic,
    KeyTopic,
    ServiceTopic,
    parse_topic,
    validate_name,
)

if TYPE_CHECKING:
    from meshchat.client.transport import Transport

__all__ = ["DirectoryResponder", "DirectoryService", "Publication"]

logger = logging.getLogger(__name__)

REFRESH_INTERVAL: Final = 3600.0
"""Seconds between checks for rosters near expiry when nothing else changed."""
_KEY_LEN: Final = 32
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Publication:
    """Something to publish (QoS 1)."""

    topic: str
    payload: bytes
    retain: bool = False


class DirectoryResponder:
    """The directory service's logic over one directory connection (blocking; one thread)."""

    def __init__(self, data_path: Path, *, clock: Callable[[], float] = time.time) -> None:
        """Open the directory and the org keys of a data directory.

        Raises:
            ConfigError: the org keys are missing.
            DirectoryError: the directory cannot be opened.
        """
        self._clock = clock
        self.directory = Directory.in_data_dir(data_path)
        self.keys = OrgKeys.open(data_path)
        self.org = self.keys.org
        self._published: dict[str, bytes] = {}
        self._changed = False

    def take_changed(self) -> bool:
        """Whether a request changed the directory since the last call."""
        changed, self._changed = self._changed, False
        return changed

    def close(self) -> None:
        """Close the directory."""
        self.directory.close()

    @property
    def request_filter(self) -> str:
        """What the service subscribes to: every user's requests."""
        return f"{ServiceTopic(self.org, DIRECTORY_SERVICE).topic}/+"

    # -------------------------------------------------------------------------- publishing

    def changes(self) -> list[Publication]:
        """Rosters and key records that differ from what was last published (retained)."""
        now = self._clock()
        wanted: dict[str, bytes] = {}
        for user in self.directory.users(include_revoked=True):
            # A revoked user's record lists no device any more, so every sender drops them.
            if self.keys.has_identity(user.name):
                wanted[KeyTopic(self.org, user.name).topic] = encode(
                    self.keys.key_record(self.directory, user.name)
                )
        groups = [group for group in self.directory.groups() if not group.expired(now)]
        groups_of: dict[str, list[str]] = {}
        for group in groups:
            for member in group.members:
                groups_of.setdefault(member, []).append(group.path)
        for user in self.directory.users():
            # Each user's groups, retained on their reply topic: clients follow changes live.
            reply_to = ServiceTopic(self.org, DIRECTORY_SERVICE, user.name, reply=True).topic
            mine = sorted(groups_of.get(user.name, []))
            wanted[reply_to] = Reply(PUSH_ID, ok=True, value=mine).encode()
        for group in groups:
            topic = GroupTopic(self.org, group.dept, group.name).roster.topic
            # Site channels carry the geofence worker's signature, the same bytes it publishes.
            signer: RosterSigner = (
                "geofence"
                if group.dept == SITES_DEPARTMENT and self.keys.has_geofence_key
                else "directory"
            )
            wanted[topic] = encode(self.keys.roster(self.directory, group.path, now, signer=signer))
        out = [
            Publication(topic, payload, retain=True)
            for topic, payload in sorted(wanted.items())
            if self._published.get(topic) != payload
        ]
        # A group that is gone: clear its retained roster.
        out += [
            Publication(topic, b"", retain=True)
            for topic in sorted(set(self._published) - set(wanted))
        ]
        return out

    def published(self, publication: Publication) -> None:
        """Remember that the broker acknowledged a publication."""
        if publication.payload:
            self._published[publication.topic] = publication.payload
        else:
            self._published.pop(publication.topic, None)

    # ---------------------------------------------------------------------------- requests

    def handle(self, topic: str, payload: bytes) -> Publication | None:
        """Answer one request; None when it cannot be answered at all (no requester)."""
        try:
            parsed = parse_topic(topic)
        except TopicError:
            return None
        if (
            not isinstance(parsed, ServiceTopic)
            or parsed.requester is None
            or parsed.reply
            or parsed.org != self.org
        ):
            return None
        user = parsed.requester
        reply_to = ServiceTopic(self.org, DIRECTORY_SERVICE, user, reply=True).topic
        try:
            request = decode_request(payload)
        except EnvelopeError as exc:
            logger.info("dropped a malformed request from %s: %s", user, exc)
            return None
        try:
            value = self._dispatch(user, request)
        except _RefusedError as exc:
            return Publication(reply_to, Reply.failure(request, str(exc)).encode())
        except MeshchatError as exc:
            logger.info("request %s from %s failed: %s", request.op, user, exc)
            return Publication(reply_to, Reply.failure(request, str(exc)).encode())
        return Publication(reply_to, Reply.success(request, value).encode())

    def _dispatch(self, user: str, request: Request) -> object:
        account = self.directory.user(user)
        if account.status is not UserStatus.ACTIVE:
            raise _RefusedError(f"{user} is revoked")
        match request.op, request.args:
            case "trust", ():
                return self.keys.trust.encode()
            case "groups", ():
                return self._groups(user)
            case "register", (str(device), bytes(signing), bytes(box)):
                return self._register(user, account.role, device, signing, box)
            case "join", (str(group),):
                return self._join(user, _group_path(group))
            case "leave", (str(group),):
                return self._leave(user, _group_path(group))
        raise _RefusedError(
            f"the directory service does not know {request.op!r} with those arguments"
        )

    def _groups(self, user: str) -> list[str]:
        now = self._clock()
        return sorted(g.path for g in self.directory.groups(member=user) if not g.expired(now))

    def _join(self, user: str, path: str) -> list[str]:
        """Add `user` to a group if the directory's permissions let them add people to it."""
        try:
            with self.directory.transaction():
                added = self.directory.add_members(user, path, [user])
                if self.directory.group(path).expired(self._clock()):
                    raise _RefusedError(f"{path} has expired")
        except PermissionDeniedError as exc:
            raise _RefusedError(
                f"{exc}. Ask an admin or a manager of {path.partition('/')[0]}: "
                f"meshchat group add {path} {user}"
            ) from exc
        if added:
            self._changed = True
            logger.info("%s joined %s", user, path)
        return self._groups(user)

    def _leave(self, user: str, path: str) -> list[str]:
        """Take `user` out of a group they are in (not a site channel)."""
        try:
            group = self.directory.group(path)
        except NotFoundError:
            group = None
        if group is None or user not in group.members:  # one answer: no hint of private groups
            raise _RefusedError(f"{user} is not a member of {path}: there is nothing to leave")
        try:
            removed = self.directory.remove_members(user, path, [user])
        except PermissionDeniedError as exc:
            if group.dept != SITES_DEPARTMENT:
                raise
            raise _RefusedError(
                f"{exc}. {path} is a site channel: the geofence adds you while you are at the "
                f"site and takes you out when you leave it; an admin can remove you with "
                f"meshchat group remove {path} {user}"
            ) from exc
        if removed:
            self._changed = True
            logger.info("%s left %s", user, path)
        return self._groups(user)

    def _register(
        self, user: str, role: Role, device: str, signing: bytes, box: bytes
    ) -> list[object]:
        if role is Role.DEVICE:
            raise _RefusedError("device accounts get their credentials from `meshchat device add`")
        try:
            validate_name(device, "device name")
        except TopicError as exc:
            raise _RefusedError(str(exc)) from exc
        if len(signing) != _KEY_LEN or len(box) != _KEY_LEN:
            raise _RefusedError("device keys must be 32 bytes each")
        token = self.directory.add_device(user, device, owner=user, kind="client")
        self.directory.set_device_keys(device, signing, box, actor=user)
        self._changed = True
        sealed = nacl.public.SealedBox(nacl.public.PublicKey(box)).encrypt(token.encode())
        logger.info("registered device %s of %s", device, user)
        return [self.keys.trust.encode(), bytes(sealed), self._groups(user)]


class _RefusedError(Exception):
    """A request refused with a message for the requester."""


def _group_path(value: str) -> str:
    """A group path from a request (network input: validated before any lookup)."""
    try:
        dept, name = parse_group_path(value)
    except MeshchatError as exc:
        raise _RefusedError(f"{value[:80]!r} is not a group: {exc}") from exc
    return f"{dept}/{name}"


class DirectoryService:
    """Runs a `DirectoryResponder` over a transport: requests in, rosters and records out."""

    def __init__(
        self,
        data_path: Path,
        transport: Transport,
        *,
        clock: Callable[[], float] = time.time,
        refresh_interval: float = REFRESH_INTERVAL,
        on_change: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """Serve the directory of `data_path` through `transport` (already entered).

        Args:
            data_path: the data directory (directory file and org keys).
            transport: a connected transport with the directory service's credentials.
            clock: the time source.
            refresh_interval: seconds between checks for rosters near expiry.
            on_change: awaited after a request changed the directory and before the reply
                goes out, so the broker's policy knows a new device before its owner uses it.
        """
        self._on_change = on_change
        self.data_path = data_path
        self.transport = transport
        self._clock = clock
        self._refresh_interval = refresh_interval
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="meshchat[dir-service]")
        self._responder: DirectoryResponder | None = None
        self._dirty = asyncio.Event()

    async def _run(self, func: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func)

    def directory_changed(self) -> None:
        """Publish what changed soon (a `DirectoryWatcher` listener calls this)."""
        self._dirty.set()

    async def run(self) -> None:
        """Serve until cancelled."""
        try:
            self._responder = await self._run(
                lambda: DirectoryResponder(self.data_path, clock=self._clock)
            )
            responder = self._responder
            await self.transport.subscribe(responder.request_filter)
            await self._publish_changes()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._refresher())
                async for message in self.transport.messages():
                    handled = functools.partial(responder.handle, message.topic, message.payload)
                    reply = await self._run(handled)
                    if responder.take_changed():
                        self._dirty.set()  # a registration: publish the new key record now
                        if self._on_change is not None:
                            await self._on_change()
                    if reply is not None:
                        self.transport.publish_nowait(reply.topic, reply.payload)
        finally:
            if self._responder is not None:
                await self._run(self._responder.close)
            self._executor.shutdown(wait=False)

    async def _refresher(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self._refresh_interval)
            self._dirty.clear()
            await self._publish_changes()

    async def _publish_changes(self) -> None:
        responder = self._responder
        assert responder is not None
        try:
            changes = await self._run(responder.changes)
        except MeshchatError:
            logger.exception("the directory service could not read the directory")
            return
        for change in changes:
            await self.transport.publish(change.topic, change.payload, retain=change.retain)
            responder.published(change)
