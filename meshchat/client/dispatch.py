"""The dispatcher's ledger of work orders: what was sent to whom, and where each one stands.

``DATA/profiles/{user}/dispatch.db`` (SQLite, beside the client store) keeps every order this
device sent (``out``) or received (``in``, an order sent to a person's device), with its state
and the time of each answer. The `Client` files every `Kind.WORKORDER` and `Kind.ORDER_STATE`
direct message here as it arrives, whether or not anyone watches its events, so `meshchat
dispatch list` shows answers that came while nobody looked.

Answers count only from the device an order went to (its signature was checked by the
session); a state change that `meshchat.device.orders.may_move` does not allow (an answer to
an order that is done, a second ``accepted``) is ignored. Orders are the dispatcher's own: a
dispatcher's other devices learn of an order from its answers (the text stays on the device
that sent it).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Self

from meshchat.device.orders import OrderState, may_move, parse_order, parse_state
from meshchat.e2ee import Direct, Kind
from meshchat.errors import ConfigError, EnvelopeError

__all__ = ["DISPATCH_FILE", "Direction", "DispatchLedger", "LedgerOrder"]

logger = logging.getLogger(__name__)

DISPATCH_FILE: Final = "dispatch.db"
Direction = str
"""``out`` (this user sent it) or ``in`` (sent to this user's device)."""
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY,
    direction TEXT NOT NULL,
    device TEXT NOT NULL,
    user TEXT NOT NULL,
    text TEXT NOT NULL,
    sent_at INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    accepted_at INTEGER,
    done_at INTEGER,
    rejected_at INTEGER,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_by_time ON orders (sent_at);
"""
_COLUMNS: Final = (
    "id, direction, device, user, text, sent_at, state, reason, accepted_at, done_at, "
    "rejected_at, updated_at"
)


@dataclass(frozen=True, slots=True)
class LedgerOrder:
    """One work order and where it stands.

    Attributes:
        order_id: its id.
        direction: ``out`` (sent from here) or ``in`` (sent to this user's device).
        device: the device it went to (``out``) or came from (``in``).
        user: that device's user.
        text: what to do (empty for an order another of this user's devices sent).
        sent_at: when it was sent (unix seconds).
        state: where it stands.
        reason: the reason given with the last answer.
        accepted_at: when it was accepted, if it was.
        done_at: when it was done, if it was.
        rejected_at: when it was rejected, if it was.
        updated_at: the time of the last change.
    """

    order_id: str
    direction: Direction
    device: str
    user: str
    text: str
    sent_at: int
    state: OrderState
    reason: str
    accepted_at: int | None
    done_at: int | None
    rejected_at: int | None
    updated_at: int

    @property
    def open(self) -> bool:
        """Whether it is neither done nor rejected."""
        return not self.state.final


def _order(row: tuple[object, ...]) -> LedgerOrder:
    (
        order_id,
        direction,
        device,
        user,
        text,
        sent_at,
        state,
        reason,
        accepted,
        done,
        rejected,
        up,
    ) = row
    return LedgerOrder(
        str(order_id),
        str(direction),
        str(device),
        str(user),
        str(text),
        int(str(sent_at)),
        OrderState(str(state)),
        str(reason),
        None if accepted is None else int(str(accepted)),
        None if done is None else int(str(done)),
        None if rejected is None else int(str(rejected)),
        int(str(up)),
    )


class DispatchLedger:
    """Work orders of one device profile, in SQLite."""

    def __init__(self, path: Path) -> None:
        """Open (or create) the ledger.

        Raises:
            ConfigError: the file cannot be used.
        """
        self.path = path
        self._lock = threading.Lock()
        try:
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise ConfigError(f"the dispatch ledger {path} cannot be used: {exc}") from exc

    def close(self) -> None:
        """Close the file."""
        self.db.close()

    def data_version(self) -> int:
        """A number that changes whenever another connection (process) commits to the ledger."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def __enter__(self) -> Self:
        """Use the ledger in a ``with`` block."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close it."""
        self.close()

    # ----------------------------------------------------------------------------- reading

    def order(self, order_id: str) -> LedgerOrder | None:
        """One order."""
        row = self.db.execute(f"SELECT {_COLUMNS} FROM orders WHERE id = ?", (order_id,)).fetchone()  # noqa: S608  # constant columns
        return None if row is None else _order(row)

    def orders(self, *, open_only: bool = False) -> list[LedgerOrder]:
        """Every order, oldest first; only those not done or rejected with `open_only`."""
        where = "WHERE state NOT IN ('done', 'rejected')" if open_only else ""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM orders {where} ORDER BY sent_at, id"  # noqa: S608  # constant SQL
        ).fetchall()
        return [_order(row) for row in rows]

    # ----------------------------------------------------------------------------- writing

    def _insert(self, order: LedgerOrder) -> bool:
        with self._lock:
            cursor = self.db.execute(
                f"INSERT OR IGNORE INTO orders ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608, E501  # constant SQL
                (
                    order.order_id,
                    order.direction,
                    order.device,
                    order.user,
                    order.text,
                    order.sent_at,
                    order.state.value,
                    order.reason,
                    order.accepted_at,
                    order.done_at,
                    order.rejected_at,
                    order.updated_at,
                ),
            )
        return cursor.rowcount > 0

    def add_sent(self, order_id: str, *, device: str, user: str, text: str, ts: int) -> LedgerOrder:
        """Record an order this device just sent."""
        order = LedgerOrder(
            order_id, "out", device, user, text, ts, OrderState.SENT, "", None, None, None, ts
        )
        self._insert(order)
        return order

    def move(self, order_id: str, state: OrderState, reason: str, ts: int) -> LedgerOrder | None:
        """Apply an answer; None when the order is unknown or cannot move there.

        Two processes may move one order at once (`dispatch answer` beside a running client
        that files the device's own answer): the row changes only if it is still in the state
        this call read, so the second of two conflicting moves is refused, not applied over the
        first.
        """
        order = self.order(order_id)
        if order is None or not may_move(order.state, state):
            return None
        column = {
            OrderState.ACCEPTED: "accepted_at",
            OrderState.DONE: "done_at",
            OrderState.REJECTED: "rejected_at",
        }[state]
        with self._lock:
            cursor = self.db.execute(
                f"UPDATE orders SET state = ?, reason = ?, {column} = ?, updated_at = ? "  # noqa: S608  # the column comes from the table above
                "WHERE id = ? AND state = ?",
                (state.value, reason, ts, ts, order_id, order.state.value),
            )
        if cursor.rowcount == 0:
            return self.move(order_id, state, reason, ts)  # it moved meanwhile: decide again
        return self.order(order_id)

    def take(self, event: Direct, *, me: str) -> LedgerOrder | None:
        """File a work order or an answer that arrived as a direct message.

        Args:
            event: the direct message (its sender device was verified by the session).
            me: this client's user.

        Returns:
            The order as it stands now, or None when nothing changed.
        """
        try:
            if event.inner.kind is Kind.WORKORDER:
                return self._received(event, me=me)
            if event.inner.kind is Kind.ORDER_STATE:
                return self._answered(event, me=me)
        except EnvelopeError as exc:
            logger.warning("ignored a work-order message from %s: %s", event.device, exc)
        return None

    def _received(self, event: Direct, *, me: str) -> LedgerOrder | None:
        order_id, text = parse_order(event.inner)
        if event.sender == me:
            return None  # sent from another of this user's devices: not an order for us
        ts = event.inner.ts
        order = LedgerOrder(
            order_id,
            "in",
            event.device,
            event.sender,
            text,
            ts,
            OrderState.RECEIVED,
            "",
            None,
            None,
            None,
            ts,
        )
        return order if self._insert(order) else None

    def _answered(self, event: Direct, *, me: str) -> LedgerOrder | None:
        change = parse_state(event.inner)
        order = self.order(change.order_id)
        if order is None:
            if event.sender == me:
                return None  # our own answer to an order this device never saw
            # Sent from another of this user's devices: learn of it from its answer.
            order = LedgerOrder(
                change.order_id,
                "out",
                event.device,
                event.sender,
                "",
                change.ts,
                OrderState.SENT,
                "",
                None,
                None,
                None,
                change.ts,
            )
            self._insert(order)
        elif order.direction == "out" and order.device != event.device:
            logger.warning(
                "ignored an answer to order %s from %s: it went to %s",
                order.order_id,
                event.device,
                order.device,
            )
            return None
        elif order.direction == "in" and event.sender != me:
            return None  # only this user's own devices answer orders sent to this user
        return self.move(change.order_id, change.state, change.reason, change.ts)
