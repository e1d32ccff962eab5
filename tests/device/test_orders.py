"""Work orders on the device, sans-IO: taken once from dispatchers only, answered by the rules."""

from __future__ import annotations

import logging

import pytest

from meshchat.device.core import DeviceCore
from meshchat.device.orders import (
    OrderState,
    may_move,
    new_order_id,
    order_inner,
    parse_state,
    state_inner,
)
from meshchat.e2ee import Direct, Kind, PairKind, encode_inner, seal_pairwise
from meshchat.envelope import encode
from meshchat.errors import EnvelopeError, OrderError
from tests.device.test_core import Fleet, inbox_shares, joined, make_fleet
from tests.e2ee.org import NOW

INBOX = "mc/acme/_d/van-1"


def order_from(fleet: Fleet, device: str, order_id: str, text: str = "pick up at gate 4") -> bytes:
    sender = fleet.devices[device]
    sealed = seal_pairwise(
        sender=device,
        sender_key=sender.signing,
        recipient="van-1",
        recipient_box=fleet.van.box.public,
        kind=PairKind.DIRECT,
        fields=(encode_inner(order_inner(order_id, text, ts=NOW)),),
    )
    return encode(sealed)


def answers_for(fleet: Fleet, device: str, payloads: dict[str, bytes]) -> list[Direct]:
    session = fleet.reader_session(device)
    events = session.on_inbox(payloads[device]).events
    return [e for e in events if isinstance(e, Direct)]


def test_an_order_from_a_dispatcher_is_taken_once_and_kept_across_restarts() -> None:
    fleet = make_fleet()
    joined(fleet, "bob", "van-1")
    payload = order_from(fleet, "bob-phone", "wo-1")
    out = fleet.feed(INBOX, payload)
    (order,) = out.orders
    assert (order.order_id, order.text, order.sender, order.sender_device) == (
        "wo-1",
        "pick up at gate 4",
        "bob",
        "bob-phone",
    )
    assert order.state is OrderState.RECEIVED
    assert out.state_changed
    assert fleet.feed(INBOX, payload).orders == []  # a QoS 1 redelivery
    restarted = DeviceCore(fleet.credentials(), state=fleet.core.state(), now=NOW)
    assert [o.order_id for o in restarted.open_orders()] == ["wo-1"]
    assert restarted.on_message(INBOX, payload, now=NOW).orders == []


def test_an_order_from_someone_outside_the_dispatch_groups_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fleet = make_fleet()
    joined(fleet, "bob", "van-1")
    fleet.record("dave")  # the device can verify dave's signature, but dave dispatches nothing
    with caplog.at_level(logging.WARNING, logger="meshchat.device.core"):
        out = fleet.feed(INBOX, order_from(fleet, "dave-laptop", "wo-2"))
    assert out.orders == []
    assert "refused work order wo-2 from dave: not in van-1's dispatch group" in caplog.text


def test_answers_reach_every_device_of_the_dispatcher_and_follow_the_rules() -> None:
    fleet = make_fleet()
    joined(fleet, "bob", "van-1")
    fleet.feed(INBOX, order_from(fleet, "bob-laptop", "wo-3"))
    accepted = inbox_shares(fleet.core.answer("wo-3", OrderState.ACCEPTED, now=NOW))
    assert sorted(accepted) == ["bob-laptop", "bob-phone"]
    (direct,) = answers_for(fleet, "bob-phone", accepted)
    assert (direct.sender, direct.device, direct.inner.kind) == ("van-1", "van-1", Kind.ORDER_STATE)
    change = parse_state(direct.inner)
    assert (change.order_id, change.state, change.reason) == ("wo-3", OrderState.ACCEPTED, "")
    with pytest.raises(OrderError, match="is accepted; it cannot become accepted"):
        fleet.core.answer("wo-3", OrderState.ACCEPTED, now=NOW)
    with pytest.raises(OrderError, match="a rejection needs a reason"):
        fleet.core.answer("wo-3", OrderState.REJECTED, " ", now=NOW)
    done = inbox_shares(fleet.core.answer("wo-3", OrderState.DONE, now=NOW + 60))
    assert parse_state(answers_for(fleet, "bob-laptop", done)[0].inner).state is OrderState.DONE
    assert fleet.core.open_orders() == []
    with pytest.raises(OrderError, match="is done; it cannot become rejected"):
        fleet.core.answer("wo-3", OrderState.REJECTED, "too late", now=NOW)
    with pytest.raises(OrderError, match="has no work order 'wo-9'"):
        fleet.core.answer("wo-9", OrderState.DONE, now=NOW)


def test_a_rejection_carries_its_reason() -> None:
    fleet = make_fleet()
    joined(fleet, "bob", "van-1")
    fleet.feed(INBOX, order_from(fleet, "bob-laptop", "wo-4"))
    out = inbox_shares(fleet.core.answer("wo-4", OrderState.REJECTED, "flat tyre", now=NOW))
    change = parse_state(answers_for(fleet, "bob-laptop", out)[0].inner)
    assert (change.state, change.reason) == (OrderState.REJECTED, "flat tyre")


def test_the_state_machine_of_an_order() -> None:
    assert may_move(OrderState.SENT, OrderState.ACCEPTED)
    assert may_move(OrderState.RECEIVED, OrderState.DONE)
    assert may_move(OrderState.ACCEPTED, OrderState.REJECTED)
    assert not may_move(OrderState.ACCEPTED, OrderState.ACCEPTED)
    assert not may_move(OrderState.DONE, OrderState.REJECTED)
    assert not may_move(OrderState.REJECTED, OrderState.DONE)
    assert not may_move(OrderState.SENT, OrderState.RECEIVED)
    assert new_order_id() != new_order_id()
    assert new_order_id().startswith("wo-")


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: order_inner("WO 1", "x", ts=NOW), "order id"),
        (lambda: order_inner("wo-1", "  ", ts=NOW), "a text of 1 to 4000"),
        (lambda: order_inner("wo-1", "x" * 4001, ts=NOW), "a text of 1 to 4000"),
        (lambda: state_inner("wo-1", OrderState.SENT, ts=NOW), "not an answer"),
        (lambda: state_inner("wo-1", OrderState.DONE, "x" * 501, ts=NOW), "at most 500"),
    ],
)
def test_malformed_orders_and_answers_are_refused(make: object, words: str) -> None:
    with pytest.raises(EnvelopeError, match=words):
        make()  # type: ignore[operator]  # a lambda
