"""The send path: seal what the outbox holds once its group is ready, publish it, clear it."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from meshchat.client._membership import group_path
from meshchat.client._receiving import Receiver
from meshchat.client._saved import saving
from meshchat.client._shared import Shared, log_failure
from meshchat.client.events import LinkChanged
from meshchat.e2ee import DeviceSession
from meshchat.e2ee.plaintext import decode_inner
from meshchat.envelope import GroupMessage, decode
from meshchat.errors import E2EEError, MeshchatError, PermissionDeniedError

__all__: list[str] = []  # internal: `meshchat.client.core` is the public face

logger = logging.getLogger(__name__)


def check_may_send(session: DeviceSession, topic: str, *, now: float) -> None:
    """Refuse a message the group's current roster forbids (not a member, announcements).

    A missing or expired roster does not refuse: the message waits for a fresh one.

    Raises:
        PermissionDeniedError: the current roster says this user may not post.
    """
    roster = session.rosters.current(topic)
    why_not = session.may_send(topic, now=now)
    if roster is not None and why_not is not None and now < roster.expires_at:
        raise PermissionDeniedError(
            f"cannot send: {why_not}", actor=session.user, permission="group.post"
        )


class Sender:
    """Works through the outbox whenever it changes: seal, publish, and forget once acked."""

    def __init__(self, shared: Shared, *, receiver: Receiver, ready_timeout: float) -> None:
        """Prepare; `receiver` keeps each message this client seals, as it would a received one."""
        self._session, self._store, self._transport = shared.session, shared.store, shared.transport
        self._clock, self._emit = shared.clock, shared.emit
        self._outbox_changed, self._records_changed = shared.outbox_changed, shared.records_changed
        self._receiver = receiver
        self._ready_timeout = ready_timeout
        self._sent = asyncio.Event()
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._waiting: dict[str, str] = {}

    @property
    def waiting_for(self) -> dict[str, str]:
        """Groups whose queued messages cannot be sealed yet, and why (no or expired roster)."""
        return dict(self._waiting)

    @property
    def inflight(self) -> list[asyncio.Task[None]]:
        """The deliveries under way (to cancel when the client stops)."""
        return list(self._inflight.values())

    async def flush(self) -> None:
        """Wait until the broker acknowledged everything queued (bound it with a timeout)."""
        while self._store.queued:
            self._sent.clear()
            self._outbox_changed.set()
            await self._sent.wait()

    async def run(self) -> None:
        """Seal and publish what the outbox holds each time it changes, until cancelled."""
        while True:
            await self._outbox_changed.wait()
            self._outbox_changed.clear()
            blocked: set[str] = set()
            self._waiting.clear()
            for item in self._store.outbox():
                if item.id in self._inflight or item.group_topic in blocked:
                    continue
                pairs = item.sealed
                if pairs is None:
                    why_not = self._session.may_send(item.group_topic, now=self._clock())
                    if why_not is not None:
                        blocked.add(item.group_topic)  # keep this group's order: wait
                        self._waiting[group_path(item.group_topic)] = why_not
                        continue
                    await self._await_records(item.group_topic)
                    pairs = self._seal(item.id, item.group_topic, item.inner)
                    if pairs is None:
                        blocked.add(item.group_topic)
                        continue
                task = asyncio.create_task(
                    self._deliver(item.id, pairs), name=f"meshchat[client].deliver.{item.id}"
                )
                task.add_done_callback(log_failure)
                self._inflight[item.id] = task

    async def _await_records(self, group_topic: str) -> None:
        """Give members' key records a moment to arrive, so every device gets the chain now."""
        roster = self._session.rosters.current(group_topic)
        if roster is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._ready_timeout):
                while any(self._session.keys.record(m) is None for m in roster.members):
                    self._records_changed.clear()
                    await self._records_changed.wait()

    def _seal(
        self, item_id: int, group_topic: str, raw: bytes
    ) -> tuple[tuple[str, bytes], ...] | None:
        try:
            inner = decode_inner(raw)
            outgoing = self._session.encrypt(group_topic, inner, now=self._clock())
        except E2EEError as exc:
            logger.warning("cannot send to %s yet: %s", group_topic, exc)
            return None
        pairs = tuple((item.topic, item.payload) for item in outgoing)
        last = outgoing[-1].payload
        message_id = _message_id(last)
        with saving(self._store, self._session):  # the chain state goes with the sealed row
            self._store.seal(item_id, list(pairs), message_id=message_id)
        # Keep our own message at once (it also comes back from the broker, deduplicated).
        self._receiver.apply(self._session.on_group_message(group_topic, last))
        return pairs

    async def _deliver(self, item_id: int, pairs: tuple[tuple[str, bytes], ...]) -> None:
        try:
            await asyncio.gather(
                *(self._transport.publish(topic, payload) for topic, payload in pairs)
            )
        except MeshchatError as exc:
            logger.warning("message %d not sent yet: %s", item_id, exc)
            return
        finally:
            self._inflight.pop(item_id, None)
        self._store.sent(item_id)
        self._sent.set()
        self._emit(LinkChanged(self._transport.state, self._store.queued))


def _message_id(payload: bytes) -> tuple[int, int]:
    envelope = decode(payload)
    assert isinstance(envelope, GroupMessage)
    return (envelope.chain_id, envelope.index)
