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

Work orders and their answers (`meshchat dispatch send|answer`) go the same way. They are
sealed to one device with this device's signing key, not with a group chain, so the short-lived
side seals them itself from the keys the running client saved, enters them in the profile's
dispatch ledger (its own SQLite file, also shared) and queues the sealed envelopes; the running
client only publishes them and records the device's answers in the same ledger.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

from meshchat.client._orders import queue_answer, queue_order
from meshchat.client._saved import saved_session
from meshchat.client.core import check_may_send, group_topic, saved_groups
from meshchat.client.dispatch import DISPATCH_FILE, DispatchLedger, LedgerOrder
from meshchat.client.profile import DeviceProfile
from meshchat.client.store import ClientStore
from meshchat.device.orders import OrderState
from meshchat.e2ee import DeviceSession, Inner, encode_inner
from meshchat.errors import NotFoundError, OrderError

__all__ = ["hand_off", "hand_off_answer", "hand_off_order"]

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
        session = _saved_session(profile, store)
        if session is not None:
            check_may_send(session, topic, now=clock())
        item = store.enqueue(topic, encode_inner(inner))
        return await _sent(store, item, wait)


async def hand_off_order(
    profile: DeviceProfile,
    device: str,
    text: str,
    *,
    wait: float,
    clock: Callable[[], float] = time.time,
) -> tuple[LedgerOrder, bool]:
    """Send a work order through the client running on the profile (see `Client.send_order`).

    Returns:
        The order as the ledger holds it, and whether the broker acknowledged it within `wait`
        seconds (if not, it is queued and goes out later).

    Raises:
        NotFoundError: no key record the running client saved lists that device.
        EnvelopeError: the text is empty or too long.
        ConfigError: the profile's store or ledger cannot be used.
    """
    with (
        ClientStore(profile.store_path, clock=clock) as store,
        DispatchLedger(profile.path / DISPATCH_FILE) as ledger,
    ):
        session = _saved_session(profile, store)
        owner = None if session is None else session.keys.owner(device)
        if session is None or owner is None:
            raise NotFoundError(
                f"no device {device!r} is known (no key record lists it on this profile)"
            )
        order, item = queue_order(
            session, store, ledger, owner=owner, device=device, text=text, now=clock()
        )
        return order, await _sent(store, item, wait)


async def hand_off_answer(
    profile: DeviceProfile,
    order_id: str,
    state: OrderState,
    reason: str,
    *,
    wait: float,
    clock: Callable[[], float] = time.time,
) -> tuple[LedgerOrder, bool]:
    """Answer a work order through the client running on the profile (`Client.answer_order`).

    Returns:
        The order as moved, and whether the broker acknowledged the answer within `wait` s.

    Raises:
        OrderError: no such order sent to this user, it cannot move there, a rejection without
            a reason, or the running client holds no keys of the dispatcher.
        ConfigError: the profile's store or ledger cannot be used.
    """
    with (
        ClientStore(profile.store_path, clock=clock) as store,
        DispatchLedger(profile.path / DISPATCH_FILE) as ledger,
    ):
        session = _saved_session(profile, store)
        if session is None:
            raise OrderError(f"cannot answer {order_id}: this profile holds no session yet")
        moved, item = queue_answer(
            session, store, ledger, order_id=order_id, state=state, reason=reason, now=clock()
        )
        return moved, await _sent(store, item, wait)


def _saved_session(profile: DeviceProfile, store: ClientStore) -> DeviceSession | None:
    """The session the running client saved last (keys, rosters), or None before its first.

    Read only: the running client owns the session state; nothing here writes it.
    """
    return saved_session(store, trust=profile.trust(), signing=profile.signing(), box=profile.box())


async def _sent(store: ClientStore, item: int, wait: float) -> bool:
    """Whether the running client got outbox item `item` acknowledged within `wait` seconds."""
    try:
        async with asyncio.timeout(wait):
            while store.pending(item):  # noqa: ASYNC110  # another process sends it
                await asyncio.sleep(_POLL)
    except TimeoutError:
        return False
    return True
