"""Work orders: sealed to one device, kept in the dispatch ledger, answered by its user."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from meshchat.client._shared import Shared
from meshchat.client.dispatch import DispatchLedger, LedgerOrder
from meshchat.client.events import OrderChanged
from meshchat.device.orders import OrderState, new_order_id, order_inner, state_inner
from meshchat.e2ee import Direct, PairKind, encode_inner, seal_pairwise
from meshchat.envelope import encode
from meshchat.errors import E2EEError, NotFoundError, OrderError
from meshchat.topics import InboxTopic

__all__: list[str] = []  # internal: `meshchat.client.core` is the public face


class WorkOrders:
    """Sends work orders and their answers through the outbox; takes the ones that arrive."""

    def __init__(self, shared: Shared, *, dispatch: DispatchLedger, ready_timeout: float) -> None:
        """Prepare; orders and their answers are kept in `dispatch`."""
        self._org, self._device, self._user = shared.org, shared.device, shared.user
        self._session, self._store = shared.session, shared.store
        self._clock, self._emit = shared.clock, shared.emit
        self._outbox_changed, self._records_changed = shared.outbox_changed, shared.records_changed
        self._dispatch = dispatch
        self._ready_timeout = ready_timeout
        self._orders_changed = asyncio.Event()

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
        user, keys = owner
        order_id = new_order_id()
        inner = order_inner(order_id, text, ts=int(self._clock()))
        sealed = seal_pairwise(
            sender=self._device,
            sender_key=self._session.signing,
            recipient=device,
            recipient_box=keys.box,
            kind=PairKind.DIRECT,
            fields=(encode_inner(inner),),
        )
        topic = InboxTopic(self._org, device).topic
        self._store.enqueue_sealed(topic, encode_inner(inner), [(topic, encode(sealed))])
        order = self._dispatch.add_sent(order_id, device=device, user=user, text=text, ts=inner.ts)
        self._outbox_changed.set()
        self._orders_changed.set()
        self._emit(OrderChanged(order))
        return order

    async def answer(self, order_id: str, state: OrderState, reason: str) -> LedgerOrder:
        """Answer a work order sent to this user (see `Client.answer_order`).

        Raises:
            OrderError: no such order sent to this user, it cannot move there, or a rejection
                without a reason.
        """
        order = self._dispatch.order(order_id)
        if order is None or order.direction != "in":
            raise OrderError(f"no work order {order_id!r} was sent to {self._user} here")
        if state is OrderState.REJECTED and not reason.strip():
            raise OrderError("a rejection needs a reason")
        moved = self._dispatch.move(order_id, state, reason, int(self._clock()))
        if moved is None:
            raise OrderError(f"work order {order_id} is {order.state}; it cannot become {state}")
        self._emit(OrderChanged(moved))
        inner = state_inner(order_id, state, reason, ts=int(self._clock()))
        try:
            outgoing = self._session.seal_direct(order.user, inner)
        except E2EEError as exc:
            raise OrderError(f"cannot answer {order_id}: {exc}") from exc
        topic = InboxTopic(self._org, order.device).topic
        pairs = [(item.topic, item.payload) for item in outgoing]
        self._store.enqueue_sealed(topic, encode_inner(inner), pairs)
        self._outbox_changed.set()
        self._orders_changed.set()
        return moved

    async def wait(self, order_id: str, check: Callable[[LedgerOrder], bool]) -> LedgerOrder:
        """Wait until the order satisfies `check` (bound it with `asyncio.timeout`)."""
        while True:
            order = self._dispatch.order(order_id)
            if order is not None and check(order):
                return order
            self._orders_changed.clear()
            await self._orders_changed.wait()

    def take(self, event: Direct) -> None:
        """A direct message: if it is a work order or an answer to one, into the ledger."""
        order = self._dispatch.take(event, me=self._user)
        if order is not None:
            self._orders_changed.set()
            self._emit(OrderChanged(order))
