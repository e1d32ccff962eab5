"""Hand a message to the client already running on a device profile.

A device profile has one MQTT client id, so two processes connected as the same device would
take the broker session from each other, and two sessions encrypting on one profile could
clobber each other's chain state. `Client` therefore holds the profile's lock while it runs.

A short-lived command (`meshchat send`, `meshchat ack`) that finds the lock held does not
connect: it checks the message against the profile's saved groups and roster, queues it in the
profile's outbox (the same SQLite store, in WAL mode) and waits for it to leave. The running
client notices the outbox changed (`Client._watch_store`), seals the message with its live
session and publishes it; when the broker acknowledged it, the row goes and this side reports
it sent. If the running client stops first, the message simply stays queued: the next client
on the profile sends it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

from meshchat.client.core import SESSION_KEY, check_may_send, group_topic, saved_groups
from meshchat.client.profile import DeviceProfile
from meshchat.client.store import ClientStore
from meshchat.e2ee import DeviceSession, Inner, encode_inner

__all__ = ["hand_off"]

_POLL: Final = 0.1
"""Seconds between looks at whether the running client has sent the message."""


async def hand_off(
    profile: DeviceProfile,
    group: str,
    inner: Inner,
    *,
    wait: float,
    clock: Callable[[], float] = time.time,
) -> bool:
    """Queue `inner` for `group` in the profile's outbox and wait up to `wait` s for it to go.

    Returns:
        True once the broker acknowledged it (through the running client); False if it is
        still queued after `wait` seconds (it goes out later, nothing is lost).

    Raises:
        NotFoundError: the user is not in that group.
        PermissionDeniedError: the group's current roster says this user may not post.
        ConfigError: the profile's store cannot be used.
    """
    with ClientStore(profile.store_path, clock=clock) as store:
        topic = group_topic(profile.org, saved_groups(store), profile.user, group)
        saved = store.get(SESSION_KEY)
        if saved is not None:
            session = DeviceSession.from_bytes(
                saved, trust=profile.trust(), signing=profile.signing(), box=profile.box()
            )
            check_may_send(session, topic, now=clock())
        item = store.enqueue(topic, encode_inner(inner))
        try:
            async with asyncio.timeout(wait):
                while store.pending(item):  # noqa: ASYNC110  # another process sends it
                    await asyncio.sleep(_POLL)
        except TimeoutError:
            return False
        return True
