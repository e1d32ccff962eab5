"""The transport's subscriptions: what the application wants, kept in step with the broker.

The broker keeps the subscriptions of a persistent session; it loses them with the session (a
clean session, an expired one, a broker restarted without its state). Each connection starts
by comparing: when the session is gone everything is subscribed again, when it is there only
what changed while the link was down is sent.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Final

from meshchat.client._link import SUBACK_FAILURE, Link, acked
from meshchat.errors import MeshchatError, PermissionDeniedError, TransportError

__all__: list[str] = []  # internal: `meshchat.client.transport` is the public face

logger = logging.getLogger(__name__)

_BATCH: Final = 100
"""Topic filters per SUBSCRIBE or UNSUBSCRIBE packet."""


class Subscriptions:
    """Wanted subscriptions, those the broker confirmed, and the callers waiting for either."""

    def __init__(self, *, broker: str, actor: str) -> None:
        """Name the broker and the actor (user or client id) in the errors."""
        self._broker = broker
        self._actor = actor
        self._wanted: dict[str, int] = {}
        self._confirmed: dict[str, tuple[int, int]] = {}  # filter -> (requested, granted)
        self._unwanted: set[str] = set()
        self._dirty = asyncio.Event()
        self._sub_waiters: dict[str, list[asyncio.Future[int]]] = {}
        self._unsub_waiters: dict[str, list[asyncio.Future[None]]] = {}

    async def add(self, topic_filter: str, qos: int) -> int:
        """Want `topic_filter`; return the granted QoS once the broker confirmed it.

        Raises:
            PermissionDeniedError: the broker refused it.
        """
        self._wanted[topic_filter] = qos
        self._unwanted.discard(topic_filter)
        confirmed = self._confirmed.get(topic_filter)
        if confirmed is not None and confirmed[0] == qos:
            return confirmed[1]
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._sub_waiters.setdefault(topic_filter, []).append(future)
        self._dirty.set()
        return await future

    async def remove(self, topic_filter: str) -> None:
        """Stop wanting `topic_filter`; return once the broker confirmed it (or has no session)."""
        self._wanted.pop(topic_filter, None)
        for waiter in self._sub_waiters.pop(topic_filter, []):
            if not waiter.done():
                waiter.set_exception(
                    TransportError(
                        f"{topic_filter!r} was unsubscribed before the broker confirmed it",
                        reason="unsubscribed",
                    )
                )
        # Sent even when never confirmed here: an earlier run may have left it in the session.
        self._unwanted.add(topic_filter)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unsub_waiters.setdefault(topic_filter, []).append(future)
        self._dirty.set()
        await future

    def session_lost(self) -> None:
        """The broker has no session: nothing is subscribed, nothing is left to unsubscribe."""
        self._confirmed.clear()
        self._unwanted.clear()
        for waiters in self._unsub_waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        self._unsub_waiters.clear()

    async def keep_in_step(self, link: Link, ack_timeout: float) -> None:
        """Send each change as it is asked for, for as long as `link` lasts."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self.sync(link, ack_timeout)

    async def sync(self, link: Link, ack_timeout: float) -> None:
        """Subscribe and unsubscribe on `link` until the broker has what is wanted."""
        while True:
            todo = [
                (topic_filter, qos)
                for topic_filter, qos in self._wanted.items()
                if self._confirmed.get(topic_filter, (None,))[0] != qos
            ][:_BATCH]
            gone = sorted(self._unwanted)[:_BATCH]
            if not todo and not gone:
                return
            if todo:
                granted = await acked(link.subscribe_all(todo), "a subscription", ack_timeout)
                for (topic_filter, qos), code in zip(todo, granted, strict=True):
                    self._answered(topic_filter, qos, code)
            if gone:
                unsubscribing = link.unsubscribe(gone, timeout=math.inf)
                await acked(unsubscribing, "an unsubscription", ack_timeout)
                for topic_filter in gone:
                    self._confirmed.pop(topic_filter, None)
                    self._unwanted.discard(topic_filter)
                    for waiter in self._unsub_waiters.pop(topic_filter, []):
                        if not waiter.done():
                            waiter.set_result(None)

    def fail_all(self, error: Callable[[], MeshchatError]) -> None:
        """Fail every caller still waiting, each with a fresh `error()`."""
        waiters: list[asyncio.Future[int] | asyncio.Future[None]] = [
            waiter for waiting in self._sub_waiters.values() for waiter in waiting
        ]
        waiters += [waiter for waiting in self._unsub_waiters.values() for waiter in waiting]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error())
        self._sub_waiters.clear()
        self._unsub_waiters.clear()

    def _answered(self, topic_filter: str, qos: int, code: int) -> None:
        waiters = self._sub_waiters.pop(topic_filter, [])
        if code < SUBACK_FAILURE:
            self._confirmed[topic_filter] = (qos, code)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(code)
            return
        # Refused (the ACL says no): forgotten, so it is not asked for after every reconnect.
        self._confirmed.pop(topic_filter, None)
        if self._wanted.get(topic_filter) == qos:
            del self._wanted[topic_filter]
        logger.warning(
            "the broker at %s refused %s the subscription to %r",
            self._broker,
            self._actor,
            topic_filter,
        )
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(
                    PermissionDeniedError(
                        f"the broker at {self._broker} refused {self._actor} the subscription "
                        f"to {topic_filter!r}",
                        actor=self._actor,
                        permission="subscribe",
                    )
                )
