"""Work orders and their acknowledgements, sans-IO: ids, states, the messages that carry them.

A work order is a direct message (`Kind.WORKORDER`: order id, text) from a dispatcher's device
to one device: sealed to it and signed, like every pairwise payload, and kept by the broker
(QoS 1, persistent session) while the device is away. The device answers with
`Kind.ORDER_STATE` (order id, state, reason) to every device of the dispatcher:

```
sent ──> accepted ──> done
  │          │
  │          └──────> rejected (reason)
  ├─────────────────> done
  └─────────────────> rejected (reason)
```

``done`` and ``rejected`` are final. A device takes orders only from the people in its dispatch
groups; an answer counts only from the device the order went to.
"""

from __future__ import annotations

import enum
import re
import secrets
from dataclasses import dataclass
from typing import Final

from meshchat.e2ee import Inner, Kind
from meshchat.errors import EnvelopeError

__all__ = [
    "ANSWERS",
    "MAX_ORDER_TEXT",
    "MAX_REASON",
    "OrderState",
    "StateChange",
    "may_move",
    "new_order_id",
    "order_inner",
    "parse_order",
    "parse_state",
    "state_inner",
]

MAX_ORDER_TEXT: Final = 4000
MAX_REASON: Final = 500
_ORDER_ID: Final = re.compile(r"\A[a-z0-9][a-z0-9-]{0,63}\Z")
_ID_ALPHABET: Final = "abcdefghijkmnpqrstuvwxyz23456789"


class OrderState(enum.StrEnum):
    """Where a work order stands."""

    SENT = "sent"
    """Sent by this dispatcher; no answer yet."""
    RECEIVED = "received"
    """Received by this device; not answered yet."""
    ACCEPTED = "accepted"
    DONE = "done"
    REJECTED = "rejected"

    @property
    def final(self) -> bool:
        """Whether nothing follows this state."""
        return self in {OrderState.DONE, OrderState.REJECTED}


ANSWERS: Final = frozenset({OrderState.ACCEPTED, OrderState.DONE, OrderState.REJECTED})
"""The states a device may answer with."""


def may_move(current: OrderState, new: OrderState) -> bool:
    """Whether an order in `current` may move to `new`."""
    if new not in ANSWERS or current.final:
        return False
    return not (current is OrderState.ACCEPTED and new is OrderState.ACCEPTED)


def new_order_id() -> str:
    """A fresh order id, short enough to type: ``wo-`` and eight letters or digits."""
    return "wo-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


def _check_id(order_id: object) -> str:
    if not isinstance(order_id, str) or not _ORDER_ID.match(order_id):
        raise EnvelopeError(f"order id {order_id!r} must be 1-64 of a-z, 0-9 and '-'")
    return order_id


def order_inner(order_id: str, text: str, *, ts: int) -> Inner:
    """The direct message that carries a work order.

    Raises:
        EnvelopeError: a bad id, an empty or too long text.
    """
    _check_id(order_id)
    if not text.strip() or len(text) > MAX_ORDER_TEXT:
        raise EnvelopeError(f"a work order needs a text of 1 to {MAX_ORDER_TEXT} characters")
    return Inner(Kind.WORKORDER, ts, (order_id, text))


def parse_order(inner: Inner) -> tuple[str, str]:
    """(order id, text) of a `Kind.WORKORDER` message.

    Raises:
        EnvelopeError: another kind, a bad id, or an empty or too long text.
    """
    if inner.kind is not Kind.WORKORDER:
        raise EnvelopeError(f"a {inner.kind.name.lower()} message is not a work order")
    order_id, text = inner.fields
    order_inner(str(order_id), str(text), ts=inner.ts)
    return str(order_id), str(text)


def state_inner(order_id: str, state: OrderState, reason: str = "", *, ts: int) -> Inner:
    """The direct message that answers a work order.

    Raises:
        EnvelopeError: a bad id, a state that is not an answer, or a too long reason.
    """
    _check_id(order_id)
    if state not in ANSWERS:
        raise EnvelopeError(f"{state} is not an answer: accepted, done or rejected")
    if len(reason) > MAX_REASON:
        raise EnvelopeError(f"a reason is at most {MAX_REASON} characters")
    return Inner(Kind.ORDER_STATE, ts, (order_id, state.value, reason))


@dataclass(frozen=True, slots=True)
class StateChange:
    """An answer to a work order, as it arrived."""

    order_id: str
    state: OrderState
    reason: str
    ts: int


def parse_state(inner: Inner) -> StateChange:
    """The answer in a `Kind.ORDER_STATE` message.

    Raises:
        EnvelopeError: another kind, a bad id, an unknown state or a too long reason.
    """
    if inner.kind is not Kind.ORDER_STATE:
        raise EnvelopeError(f"a {inner.kind.name.lower()} message is not an order answer")
    order_id, state, reason = (str(field) for field in inner.fields)
    try:
        parsed = OrderState(state)
    except ValueError as exc:
        raise EnvelopeError(f"order state {state!r} is unknown") from exc
    state_inner(order_id, parsed, reason, ts=inner.ts)
    return StateChange(order_id, parsed, reason, inner.ts)
