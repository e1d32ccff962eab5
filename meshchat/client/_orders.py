"""Work orders: sealed to one device, kept in the dispatch ledger, answered by its user."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from meshchat.client._shared import Shared
from meshchat.client.dispatch import DispatchLedger, LedgerOrder
from meshchat.client.events import OrderChanged
from meshchat.client.store import ClientStore
from meshchat.device.orders import OrderState, new_order_id, order_inner, state_inner
from meshchat.e2ee import DeviceKeys, DeviceSession, Direct, PairKind, encode_inner, seal_pairwise
from meshchat.envelope import encode
from meshchat.errors import E2EEError, NotFoundError, OrderError
from meshchat.topics import InboxTopic

__all__: list[str] = []  # internal: `meshchat.client.core` is the public face


def queue_order(
    session: DeviceSession,
    store: ClientStore,
    dispatch: DispatchLedger,
    *,
    owner: tuple[str, DeviceKeys],
    device: str,
    text: str,
    now: float,
) -> tuple[LedgerOrder, int]:
    """Seal a work order to `device` (of user and keys `owner`), queue it, enter it in the ledger.

    Sealing needs only this device's signing key and the recipient's box key, never a chain, so
    a process that does not run the profile's client may do it too (`meshchat.client.handoff`).

    Returns:
        The order as entered in the ledger, and its outbox id.

    Raises:
        EnvelopeError: the text is empty or too long.
    """
    user, keys = owner
    order_id = new_order_id()
    inner = order_inner(order_id, text, ts=int(now))
    sealed = seal_pairwise(
        sender=session.device,
        sender_key=session.signing,
        recipient=device,
        recipient_box=keys.box,
        kind=PairKind.DIRECT,
        fields=(encode_inner(inner),),
    )
    topic = InboxTopic(session.org, device).topic
    item = store.enqueue_sealed(topic, encode_inner(inner), [(topic, encode(sealed))])
    return dispatch.add_sent(order_id, device=device, user=user, text=text, ts=inner.ts), item


def queue_answer(
    session: DeviceSession,
    store: ClientStore,
    dispatch: DispatchLedger,
    *,
    order_id: str,
    state: OrderState,
    reason: str,
    now: float,
) -> tuple[LedgerOrder, int]:
    """Answer a work order sent to this user: seal the answer, move the ledger, queue it.

    The answer is sealed before the ledger moves, so an answer that cannot be sealed leaves the
    order as it was.

    Returns:
        The order as moved, and the answer's outbox id.

    Raises:
        OrderError: no such order sent to this user, it cannot move there, a rejection without
            a reason, or no key record of the dispatcher has arrived.
    """
    order = dispatch.order(order_id)
    if order is None or order.direction != "in":
        raise OrderError(f"no work order {order_id!r} was sent to {session.user} here")
    if state is OrderState.REJECTED and not reason.strip():
        raise OrderError("a rejection needs a reason")
    inner = state_inner(order_id, state, reason, ts=int(now))
    try:
        outgoing = session.seal_direct(order.user, inner)
    except E2EEError as exc:
        raise OrderError(f"cannot answer {order_id}: {exc}") from exc
    moved = dispatch.move(order_id, state, reason, int(now))
    if moved is None:
        raise OrderError(f"work order {order_id} is {order.state}; it cannot become {state}")
    topic = InboxTopic(session.org, order.device).topic
    pairs = [(item.topic, item.payload) for item in outgoing]
    return moved, store.enqueue_sealed(topic, encode_inner(inner), pairs)


class WorkOrders:
    """Sends work orders and their answers through the outbox; takes the ones that arrive."""

    def __init__(self, shared: Shared, *, dispatch: DispatchLedger, ready_timeout: float) -> None:
        """Prepare; orders and their answers are kept in `dispatch`."""
        self._user = shared.user
        self._session, self._store = shared.session, shared.store
        self._clock, self._emit = shared.clock, shared.emit
        self._outbox_changed, self._records_changed = shared.outbox_changed, shared.records_changed
        self._dispatch = dispatch
        self._ready_timeout = ready_timeout
        self._orders_changed = asyncio.Event()
        # The orders as last reported, to tell another process's changes from this client's.
        self._known = {order.order_id: order for order in dispatch.orders()}

    async def send(self, device: str, text: str) -> LedgerOrder:
        """Send a work order to one device (see `Client.send_order`).

        Raises:
            NotFoundError: no key record lists that device (after waiting `ready_timeout`).
            EnvelopeError: the text is empty or too long.
        """
        owner = self._session.keys.owner(device)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._ready_timeout):
                while owner is None:
                    self._records_changed.clear()
                    await self._records_changed.wait()
                    owner = self._session.keys.owner(device)
        if owner is None:
            raise NotFoundError(f"no device {device!r} is known (no key record lists it)")
        order, _ = queue_order(
            self._session,
            self._store,
            self._dispatch,
            owner=owner,
            device=device,
            text=text,
            now=self._clock(),
        )
        self._outbox_changed.set()
        self._report(order)
        return order

    async def answer(self, order_id: str, state: OrderState, reason: str) -> LedgerOrder:
        """Answer a work order sent to this user (see `Client.answer_order`).

        Raises:
            OrderError: no such order sent to this user, it cannot move there, or a rejection
                without a reason.
        """
        moved, _ = queue_answer(
            self._session,
            self._store,
            self._dispatch,
            order_id=order_id,
            state=state,
            reason=reason,
            now=self._clock(),
        )
        self._outbox_changed.set()
        self._report(moved)
        return moved

    async def wait(self, order_id: str, check: Callable[[LedgerOrder], bool]) -> LedgerOrder:
        """Wait until the order satisfies `check` (bound it with `asyncio.timeout`)."""
        while True:
            order = self._dispatch.order(order_id)
            if order is not None and check(order):
                return order
            self._orders_changed.clear()
            await self._orders_changed.wait()

    def reconcile(self) -> None:
        """Report each order of the shared ledger that differs from what was last reported.

        Called when another process (`meshchat dispatch` beside this client) changed the ledger.
        """
        for order in self._dispatch.orders():
            if self._known.get(order.order_id) != order:
                self._report(order)

    def take(self, event: Direct) -> None:
        """A direct message: if it is a work order or an answer to one, into the ledger."""
        order = self._dispatch.take(event, me=self._user)
        if order is not None:
            self._report(order)

    def _report(self, order: LedgerOrder) -> None:
        self._known[order.order_id] = order
        self._orders_changed.set()
        self._emit(OrderChanged(order))
