"""The dispatcher's ledger: answers count only from the device an order went to, in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshchat.client.dispatch import DispatchLedger, LedgerOrder
from meshchat.device.orders import OrderState, order_inner, state_inner
from meshchat.e2ee import Direct, Inner, Kind

NOW = 1_800_000_000


@pytest.fixture
def ledger(tmp_path: Path) -> DispatchLedger:
    return DispatchLedger(tmp_path / "dispatch.db")


def answer(order_id: str, state: OrderState, reason: str = "", *, ts: int = NOW) -> Inner:
    return state_inner(order_id, state, reason, ts=ts)


def test_a_sent_order_moves_with_the_answers_of_its_device(ledger: DispatchLedger) -> None:
    ledger.add_sent("wo-1", device="van-1", user="van-1", text="gate 4", ts=NOW)
    taken = ledger.take(
        Direct("van-1", "van-1", answer("wo-1", OrderState.ACCEPTED, ts=NOW + 5)), me="bob"
    )
    assert taken is not None
    assert (taken.state, taken.accepted_at) == (OrderState.ACCEPTED, NOW + 5)
    done = ledger.take(
        Direct("van-1", "van-1", answer("wo-1", OrderState.DONE, ts=NOW + 60)), me="bob"
    )
    assert done is not None
    assert (done.state, done.done_at, done.open) == (OrderState.DONE, NOW + 60, False)
    late = Direct("van-1", "van-1", answer("wo-1", OrderState.REJECTED, "x", ts=NOW + 70))
    assert ledger.take(late, me="bob") is None  # done is final
    assert ledger.orders(open_only=True) == []
    reopened = DispatchLedger(ledger.path)
    order = reopened.order("wo-1")
    assert order is not None
    assert (order.text, order.state, order.accepted_at, order.done_at) == (
        "gate 4",
        OrderState.DONE,
        NOW + 5,
        NOW + 60,
    )


def test_another_device_cannot_answer_for_the_one_the_order_went_to(
    ledger: DispatchLedger,
) -> None:
    ledger.add_sent("wo-2", device="van-1", user="van-1", text="gate 4", ts=NOW)
    forged = Direct("van-2", "van-2", answer("wo-2", OrderState.DONE))
    assert ledger.take(forged, me="bob") is None
    order = ledger.order("wo-2")
    assert order is not None
    assert order.state is OrderState.SENT


def test_an_answer_to_an_order_from_another_of_my_devices_teaches_this_one(
    ledger: DispatchLedger,
) -> None:
    taken = ledger.take(
        Direct("van-1", "van-1", answer("wo-3", OrderState.REJECTED, "flat tyre")), me="bob"
    )
    assert taken is not None
    assert (taken.direction, taken.device, taken.state, taken.reason) == (
        "out",
        "van-1",
        OrderState.REJECTED,
        "flat tyre",
    )


def test_an_order_to_this_user_is_received_once_and_answered_from_here(
    ledger: DispatchLedger,
) -> None:
    order = Direct("bob", "bob-laptop", order_inner("wo-4", "check pallet 7", ts=NOW))
    received = ledger.take(order, me="carol")
    assert received is not None
    assert (received.direction, received.user, received.state) == ("in", "bob", OrderState.RECEIVED)
    assert ledger.take(order, me="carol") is None  # a redelivery
    own_copy = Direct("carol", "carol-phone", order_inner("wo-5", "x", ts=NOW))
    assert ledger.take(own_copy, me="carol") is None
    moved = ledger.move("wo-4", OrderState.ACCEPTED, "", NOW + 1)
    assert moved is not None
    assert moved.state is OrderState.ACCEPTED
    assert (
        ledger.take(Direct("bob", "bob-laptop", answer("wo-4", OrderState.DONE)), me="carol")
        is None
    )


def test_malformed_messages_change_nothing(ledger: DispatchLedger) -> None:
    bad = Direct("van-1", "van-1", Inner(Kind.ORDER_STATE, NOW, ("wo-6", "finished", "")))
    assert ledger.take(bad, me="bob") is None
    assert ledger.orders() == []


def test_two_processes_answering_at_once_never_overwrite_each_other(
    ledger: DispatchLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # carol's running client and her `dispatch answer` share the ledger file.
    order = Direct("bob", "bob-laptop", order_inner("wo-7", "check pallet 9", ts=NOW))
    assert ledger.take(order, me="carol") is not None
    other = DispatchLedger(ledger.path)
    read = ledger.order

    def read_then_the_other_process_moves(order_id: str) -> LedgerOrder | None:
        found = read(order_id)
        if found is not None and found.state is OrderState.RECEIVED:
            # Between this process's read and its write, the other one rejects the order.
            assert other.move(order_id, OrderState.REJECTED, "pallet 9 is gone", NOW + 1)
        return found

    monkeypatch.setattr(ledger, "order", read_then_the_other_process_moves)
    assert ledger.move("wo-7", OrderState.ACCEPTED, "", NOW + 2) is None  # rejected is final
    final = other.order("wo-7")
    assert final is not None
    assert (final.state, final.reason, final.accepted_at) == (
        OrderState.REJECTED,
        "pallet 9 is gone",
        None,
    )
