"""`meshchat dispatch`: send work orders to devices, follow their answers, answer your own."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import (
    DEFAULT_DATA,
    DataOption,
    JsonOption,
    console,
    emit_json,
    err_console,
    fail,
)
from meshchat.client import Client, DeviceProfile, open_profile
from meshchat.client.dispatch import DISPATCH_FILE, DispatchLedger, LedgerOrder
from meshchat.client.handoff import hand_off_answer, hand_off_order
from meshchat.device import OrderState
from meshchat.errors import BusyError, MeshchatError

__all__ = ["dispatch_app"]

dispatch_app = typer.Typer(
    help="Work orders: send them to devices, follow their answers, answer your own.",
    no_args_is_help=True,
)

AsUserOption = Annotated[
    str | None,
    typer.Option(
        "--as", envvar="MESHCHAT_AS", help="Use this user's device profile (needed with several)."
    ),
]
BrokerOption = Annotated[
    str | None,
    typer.Option("--broker", envvar="MESHCHAT_BROKER", help="Broker URL (default: the profile's)."),
]
WaitOption = Annotated[
    float, typer.Option("--wait", help="Seconds to wait for the broker before giving up.")
]


def _profile(data: Path, user: str | None) -> DeviceProfile:
    try:
        return open_profile(data, user)
    except MeshchatError as exc:
        fail(str(exc))


def _when(ts: int | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).astimezone().strftime("%Y-%m-%d %H:%M")


def _order_json(order: LedgerOrder) -> dict[str, object]:
    return {
        "id": order.order_id,
        "direction": order.direction,
        "device": order.device,
        "user": order.user,
        "text": order.text,
        "state": order.state.value,
        "reason": order.reason,
        "sent_at": order.sent_at,
        "accepted_at": order.accepted_at,
        "done_at": order.done_at,
        "rejected_at": order.rejected_at,
        "updated_at": order.updated_at,
    }


async def _flushed(client: Client, wait: float) -> bool:
    try:
        async with asyncio.timeout(wait):
            await client.flush()
    except TimeoutError:
        return False
    return True


def _not_sent_yet(what: str) -> None:
    err_console.print(
        f"[bold yellow]not sent yet:[/] {what} is kept in the outbox and goes out with the next "
        "`meshchat dispatch`, `send`, `tail` or `chat`.",
        soft_wrap=True,
    )
    raise typer.Exit(3)


@dispatch_app.command("send")
def send(
    device: Annotated[
        str, typer.Argument(help="The device: a device account (van-1) or a person's device.")
    ],
    text: Annotated[str, typer.Argument(help="What to do.")],
    as_user: AsUserOption = None,
    broker: BrokerOption = None,
    wait: WaitOption = 15.0,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Send a work order (end-to-end encrypted); the device gets it even if it is offline now.

    Its answers (accepted, done, rejected with a reason) show in `meshchat dispatch list`.
    Exit code 3: the broker was not reached in time; the order waits in the outbox.
    """
    profile = _profile(data, as_user)

    async def work() -> tuple[LedgerOrder, bool]:
        try:
            client = Client(profile, broker=broker, send_receipts=False)
        except BusyError:  # a `tail` or `chat` runs on this profile: it sends for us
            return await hand_off_order(profile, device, text, wait=wait)
        async with client:
            order = await client.send_order(device, text)
            return order, await _flushed(client, wait)

    try:
        order, delivered = asyncio.run(work())
    except MeshchatError as exc:
        fail(str(exc))
    if json_output:
        emit_json(_order_json(order) | {"queued": not delivered})
    elif delivered:
        console.print(f"Sent work order [bold]{order.order_id}[/] to {device}.")
    if not delivered:
        _not_sent_yet(f"work order {order.order_id}")


@dispatch_app.command("answer")
def answer(
    order_id: Annotated[str, typer.Argument(help="The order's id (wo-...).")],
    state: Annotated[
        str, typer.Argument(help="accepted, done or rejected.", metavar="accepted|done|rejected")
    ],
    reason: Annotated[
        str, typer.Option("--reason", help="Why (needed to reject; optional otherwise).")
    ] = "",
    as_user: AsUserOption = None,
    broker: BrokerOption = None,
    wait: WaitOption = 15.0,
    data: DataOption = DEFAULT_DATA,
) -> None:
    """Answer a work order sent to one of your devices; the dispatcher sees the change."""
    try:
        wanted = OrderState(state)
    except ValueError:
        fail(f"{state!r} is not an answer: accepted, done or rejected", code=2)
    profile = _profile(data, as_user)

    async def work() -> bool:
        try:
            client = Client(profile, broker=broker, send_receipts=False)
        except BusyError:  # a `tail` or `chat` runs on this profile: it sends for us
            _, sent = await hand_off_answer(profile, order_id, wanted, reason, wait=wait)
            return sent
        async with client:
            await client.answer_order(order_id, wanted, reason)
            return await _flushed(client, wait)

    try:
        delivered = asyncio.run(work())
    except MeshchatError as exc:
        fail(str(exc))
    if not delivered:
        _not_sent_yet(f"the answer to {order_id}")
    console.print(f"Answered {order_id}: {wanted.value}.")


@dispatch_app.command("list")
def list_orders(
    open_only: Annotated[
        bool, typer.Option("--open", help="Only orders not done or rejected.")
    ] = False,
    as_user: AsUserOption = None,
    broker: BrokerOption = None,
    catch_up: Annotated[
        float,
        typer.Option(
            "--catch-up", help="Seconds to collect answers waiting at the broker first (0: none)."
        ),
    ] = 3.0,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Every work order of this device profile with its state and times.

    Beside a running `tail` or `chat` on the profile, the orders are read from its ledger, which
    that process keeps up to date.
    """
    profile = _profile(data, as_user)

    async def work() -> list[LedgerOrder]:
        try:
            client = Client(profile, broker=broker, send_receipts=False)
        except BusyError:  # the running client records every answer as it arrives
            with DispatchLedger(profile.path / DISPATCH_FILE) as ledger:
                return ledger.orders(open_only=open_only)
        async with client:
            if catch_up > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(catch_up):
                        async for _ in client.events():
                            pass
            return client.dispatch.orders(open_only=open_only)

    try:
        orders = asyncio.run(work())
    except MeshchatError as exc:
        fail(str(exc))
    if json_output:
        emit_json([_order_json(order) for order in orders])
        return
    if not orders:
        console.print("No work orders." if not open_only else "No open work orders.")
        return
    table = Table("order", "to / from", "text", "state", "sent", "accepted", "finished", "reason")
    for order in orders:
        peer = f"to {order.device}" if order.direction == "out" else f"from {order.user}"
        table.add_row(
            order.order_id,
            peer,
            order.text,
            order.state.value,
            _when(order.sent_at),
            _when(order.accepted_at),
            _when(order.done_at or order.rejected_at),
            order.reason,
        )
    console.print(table)
