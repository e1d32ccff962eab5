"""Work orders and answers from a second process on a profile whose client is running.

`meshchat dispatch send|answer` beside a `tail` or `chat` cannot run a second client on the
profile: they seal the order or the answer themselves, queue it, and the running client sends it.
Here the running clients are real, in this process, and the hand-offs open the profiles' files
as another process would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from meshchat.client import Client, OrderChanged
from meshchat.client.dispatch import LedgerOrder
from meshchat.client.handoff import hand_off_answer, hand_off_order
from meshchat.device import OrderState
from meshchat.errors import NotFoundError, OrderError
from tests.device.conftest import Fleet

WAIT = 20.0


async def until(client: Client, order_id: str, check: Callable[[LedgerOrder], bool]) -> LedgerOrder:
    async with asyncio.timeout(WAIT):
        return await client.wait_order(order_id, check)


async def test_an_order_and_its_answer_go_through_the_running_clients(fleet: Fleet) -> None:
    bob_profile = await fleet.login("bob")
    carol_profile = await fleet.login("carol")
    async with Client(carol_profile) as carol, Client(bob_profile) as bob:
        # bob's own client sends one first: it waits for carol's key record, which it then saves.
        first = await bob.send_order("carol-laptop", "sweep bay 1")
        order, sent = await hand_off_order(
            bob_profile, "carol-laptop", "count the returns in bay 2", wait=WAIT
        )
        assert sent
        received = await until(carol, order.order_id, lambda _order: True)
        assert (received.direction, received.user, received.text) == (
            "in",
            "bob",
            "count the returns in bay 2",
        )
        # bob's running client files carol's answer in the ledger the hand-off wrote to.
        moved, sent = await hand_off_answer(
            carol_profile, order.order_id, OrderState.REJECTED, "bay 2 is locked", wait=WAIT
        )
        assert sent
        assert moved.state is OrderState.REJECTED
        # bob's running client (his chat's /dispatch lines) heard of the order it did not send,
        # and of every change once only: its own order was not reported again when the other
        # process wrote to the ledger.
        reports = await order_events_until(
            bob, lambda o: o.order_id == order.order_id and o.state is OrderState.REJECTED
        )
        assert sorted((o.order_id, o.state.value) for o in reports) == sorted(
            [
                (first.order_id, "sent"),
                (order.order_id, "sent"),
                (order.order_id, "rejected"),
            ]
        )
        assert reports[-1].text == "count the returns in bay 2"
        answered = reports[-1]
        assert (answered.device, answered.reason) == ("carol-laptop", "bay 2 is locked")
        with pytest.raises(OrderError, match="is rejected"):
            await hand_off_answer(carol_profile, order.order_id, OrderState.DONE, "", wait=WAIT)
        with pytest.raises(OrderError, match="needs a reason"):
            await hand_off_answer(carol_profile, order.order_id, OrderState.REJECTED, "", wait=1)
        with pytest.raises(NotFoundError, match="no device 'van-9' is known"):
            await hand_off_order(bob_profile, "van-9", "anything", wait=1)
        assert {o.order_id for o in bob.dispatch.orders()} == {first.order_id, order.order_id}


async def order_events_until(
    client: Client, last: Callable[[LedgerOrder], bool]
) -> list[LedgerOrder]:
    """Every order report of the client, up to and including the first that `last` accepts."""
    reported: list[LedgerOrder] = []
    async with asyncio.timeout(WAIT):
        async for event in client.events():
            if isinstance(event, OrderChanged):
                reported.append(event.order)
                if last(event.order):
                    return reported
    raise AssertionError("no OrderChanged")
