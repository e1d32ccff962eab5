"""Client commands: `meshchat login`, `send`, `tail` and `history`.

They work from a device profile (``DATA/profiles/{user}``) that `login` creates on this machine;
the server's files are never needed (on the server's own machine they only supply defaults).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Final, TypeVar

import typer
from rich.markup import escape

from cli.common import (
    DEFAULT_DATA,
    DataOption,
    JsonOption,
    PasswordStdinOption,
    console,
    emit_json,
    err_console,
    fail,
    local_broker,
    read_password,
)
from meshchat.client import (
    AckStatus,
    Alarm,
    Client,
    ClientEvent,
    DeviceProfile,
    GroupsChanged,
    LinkChanged,
    Mention,
    Message,
    OrderChanged,
    SiteNotice,
    Unreadable,
    default_device_name,
    login,
    open_profile,
)
from meshchat.client.core import group_topic, saved_groups
from meshchat.client.handoff import hand_off
from meshchat.client.store import ClientStore, StoredMessage
from meshchat.directory import DIRECTORY_FILE, Directory
from meshchat.e2ee import Inner, Kind
from meshchat.errors import BusyError, MeshchatError
from meshchat.server import DEFAULT_ORG
from meshchat.timeutil import parse_duration

__all__ = ["ack", "acks", "history", "login_command", "send", "tail"]

DEFAULT_BROKER: Final = "mqtt://127.0.0.1:1883"
T = TypeVar("T")

BrokerOption = Annotated[
    str | None,
    typer.Option(
        "--broker",
        envvar="MESHCHAT_BROKER",
        help="Broker URL (mqtt://, mqtts://, ws://); default: the profile's, else "
        "mqtt://127.0.0.1:1883.",
    ),
]
AsUserOption = Annotated[
    str | None,
    typer.Option(
        "--as", envvar="MESHCHAT_AS", help="Use this user's device profile (needed with several)."
    ),
]
GroupArgument = Annotated[str, typer.Argument(help="The group, DEPT/GROUP.")]


def _run(work: Callable[[], Coroutine[object, object, T]]) -> T:
    """Run a coroutine; meshchat errors become one `error:` line, Ctrl-C a quiet exit."""
    try:
        return asyncio.run(work())
    except MeshchatError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _profile(data: Path, user: str | None) -> DeviceProfile:
    try:
        return open_profile(data, user)
    except MeshchatError as exc:
        fail(str(exc))


def _local_defaults(data: Path) -> tuple[str | None, str | None]:
    """(org, broker) of a site server running from the same data directory, if any."""
    org = None
    with contextlib.suppress(MeshchatError, OSError, ValueError):
        if (data / DIRECTORY_FILE).exists():
            with Directory(data / DIRECTORY_FILE) as directory:
                org = directory.org
    broker = local_broker(data)
    return org, broker


def login_command(
    user: Annotated[str, typer.Argument(help="Your user name.")],
    device: Annotated[
        str | None,
        typer.Option("--device", help="Name for this device (default: USER-HOSTNAME)."),
    ] = None,
    org: Annotated[
        str | None,
        typer.Option(
            "--org",
            envvar="MESHCHAT_ORG",
            help=f"The org (default: the local server's, else {DEFAULT_ORG}).",
        ),
    ] = None,
    broker: BrokerOption = None,
    fingerprint: Annotated[
        str | None,
        typer.Option(
            "--fingerprint",
            help="The org root key's fingerprint your admin gave you; login stops if it differs.",
        ),
    ] = None,
    password_stdin: PasswordStdinOption = False,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Create a device profile and keys on this machine and register them with your password.

    The keys never leave this machine; the password is used for this one login and not kept.
    """
    local_org, local_broker = _local_defaults(data)
    org = org or local_org or DEFAULT_ORG
    broker = broker or local_broker or DEFAULT_BROKER
    device = device or default_device_name(user)
    password = read_password(from_stdin=password_stdin, confirm=False)
    profile = _run(
        lambda: login(
            data,
            broker=broker,
            org=org,
            user=user,
            password=password,
            device=device,
            fingerprint=fingerprint,
        )
    )
    result = {
        "user": profile.user,
        "device": profile.device,
        "org": profile.org,
        "broker": profile.broker,
        "fingerprint": profile.fingerprint,
        "profile": str(profile.path),
    }
    if json_output:
        emit_json(result)
        return
    console.print(
        f"Logged in as [bold]{profile.user}[/] on device [bold]{profile.device}[/] "
        f"(org {profile.org}, broker {profile.broker}).",
        soft_wrap=True,
    )
    if fingerprint is None:
        console.print(
            f"Org root fingerprint: [bold]{profile.fingerprint}[/]. Compare it with the one your "
            "admin announced; next time pass it with --fingerprint.",
            soft_wrap=True,
        )


def _message_ref(text: str | None, what: str = "--reply") -> tuple[int, int] | None:
    if text is None:
        return None
    chain, _, index = text.partition(":")
    if not (chain.isdigit() and index.isdigit()):
        fail(f"{what} {text!r}: give a message id as CHAIN:INDEX (see `history --json`)", code=2)
    return int(chain), int(index)


async def _deliver(
    profile: DeviceProfile, broker: str | None, group: str, inner: Inner, wait: float
) -> tuple[bool, str]:
    """Send one message and wait for the broker: (delivered, why not)."""
    try:
        client = Client(profile, broker=broker)
    except BusyError as exc:  # a `tail` or `chat` runs on this profile: it sends for us
        if await hand_off(profile, group, inner, wait=wait):
            return True, ""
        return False, (
            f"the meshchat process using this profile (pid {exc.pid}) has not sent it "
            f"within {wait:.0f} s"
        )
    async with client:
        await client.send_inner(group, inner)
        try:
            async with asyncio.timeout(wait):
                await client.flush()
        except TimeoutError:
            reason = client.waiting_for.get(group)
            if reason is None:
                reason = f"no acknowledgement from the broker within {wait:.0f} s"
            return False, reason
        return True, ""


def send(
    group: GroupArgument,
    text: Annotated[str, typer.Argument(help="The message (markdown).")],
    as_user: AsUserOption = None,
    reply: Annotated[
        str | None, typer.Option("--reply", help="Reply to message CHAIN:INDEX.")
    ] = None,
    urgent: Annotated[
        bool, typer.Option("--urgent", help="An urgent notice that asks for acknowledgements.")
    ] = False,
    broker: BrokerOption = None,
    wait: Annotated[
        float, typer.Option("--wait", help="Seconds to wait for the broker before giving up.")
    ] = 15.0,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Send a message to a group (end-to-end encrypted).

    When the broker cannot be reached in time the message stays in this device's outbox and goes
    out with the next `send`, `tail` or `chat`; the exit code is then 3.
    """
    profile = _profile(data, as_user)
    target = _message_ref(reply)
    if urgent and target is not None:
        fail("--urgent and --reply cannot be combined", code=2)
    now = int(time.time())
    if urgent:
        inner = Inner(Kind.URGENT, now, (text,))
    elif target is not None:
        inner = Inner(Kind.REPLY, now, (text, target))
    else:
        inner = Inner(Kind.TEXT, now, (text,))

    delivered, reason = _run(lambda: _deliver(profile, broker, group, inner, wait))
    if json_output:
        emit_json({"group": group, "sent": delivered} | ({"reason": reason} if reason else {}))
    elif delivered:
        console.print(f"Sent to {group}.")
    if not delivered:
        err_console.print(
            f"[bold yellow]not sent yet:[/] {reason}; the message is kept in the outbox and "
            "goes out with the next `meshchat send`, `tail` or `chat`.",
            soft_wrap=True,
        )
        raise typer.Exit(3)


def _event_json(event: ClientEvent) -> dict[str, object]:  # noqa: PLR0911  # one per kind
    match event:
        case Message():
            return {
                "event": "message",
                "group": event.group,
                "id": f"{event.message_id[0]}:{event.message_id[1]}",
                "sender": event.sender,
                "device": event.device,
                "kind": event.kind.name.lower(),
                "ts": event.ts,
                "text": event.text,
            }
        case Unreadable():
            return {
                "event": "unreadable",
                "group": event.group,
                "id": f"{event.message_id[0]}:{event.message_id[1]}",
                "reason": event.reason,
            }
        case Alarm():
            return {"event": "alarm", "what": event.what, "reason": event.reason}
        case GroupsChanged():
            return {"event": "groups", "groups": list(event.groups)}
        case Mention():
            return {
                "event": "mention",
                "group": event.group,
                "id": f"{event.message_id[0]}:{event.message_id[1]}",
                "sender": event.sender,
                "text": event.text,
            }
        case AckStatus():
            return {
                "event": "acks",
                "group": event.group,
                "id": f"{event.message_id[0]}:{event.message_id[1]}",
                "unacknowledged": list(event.missing),
            }
        case SiteNotice():
            return {"event": "notice", "group": event.group, "kind": event.kind, "text": event.text}
        case LinkChanged():
            return {"event": "link", "state": event.state.value, "queued": event.queued}
        case OrderChanged(order=order):
            return {
                "event": "order",
                "id": order.order_id,
                "device": order.device,
                "state": order.state.value,
                "reason": order.reason,
            }
    return {"event": "presence", "user": event.user, "device": event.device, "online": event.online}


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).astimezone().strftime("%Y-%m-%d %H:%M")


def _describe(event: Message) -> str | None:  # noqa: PLR0911  # one per kind
    """What follows the sender on a `tail` line; None for what is not worth a line (receipts)."""
    target = event.target
    ref = "?" if target is None else f"{target[0]}:{target[1]}"
    match event.kind:
        case Kind.URGENT:
            return f" [bold red]URGENT[/]: {escape(event.text)}"
        case Kind.RECEIPT | Kind.TELEMETRY_KEY:
            return None
        case Kind.REPLY:
            return f" [dim](reply to {ref})[/]: {escape(event.text)}"
        case Kind.EDIT:
            return f" [dim]edited {ref}:[/] {escape(event.text)}"
        case Kind.RECALL:
            return f" [dim]recalled {ref}[/]"
        case Kind.REACT:
            return f" [dim]reacted {escape(event.text)} to {ref}[/]"
        case Kind.ACK:
            return f" [dim]acknowledged {ref}[/]"
    return f": {escape(event.text)}"


def _print_event(event: ClientEvent) -> None:
    match event:
        case Message():
            line = _describe(event)
            if line is not None:
                console.print(
                    f"[dim]{_clock(event.ts)}[/] [bold]{escape(event.sender)}[/]{line}",
                    soft_wrap=True,
                    markup=True,
                )
        case Unreadable():
            console.print(
                f"[dim]message {event.message_id}: {escape(event.reason)}[/]", soft_wrap=True
            )
        case Alarm():
            err_console.print(
                f"[bold red]alarm:[/] {escape(event.what)}: {escape(event.reason)}", soft_wrap=True
            )
        case LinkChanged():
            err_console.print(f"[dim]link {event.state.value}, {event.queued} queued[/]")
        case GroupsChanged():
            err_console.print(f"[dim]your groups: {', '.join(event.groups)}[/]")
        case Mention():
            console.print(
                f"[bold yellow]@ {escape(event.sender)} mentioned you:[/] {escape(event.text)}"
            )
        case SiteNotice():
            console.print(f"[bold cyan]notice:[/] {escape(event.text)}", markup=True)
        case AckStatus():
            missing = ", ".join(event.missing) or "nobody"
            console.print(f"[dim]urgent {event.message_id}: not acknowledged by {missing}[/]")


def tail(
    group: GroupArgument,
    as_user: AsUserOption = None,
    broker: BrokerOption = None,
    data: DataOption = DEFAULT_DATA,
    json_output: Annotated[
        bool, typer.Option("--json", help="One JSON object per event and line, flushed.")
    ] = False,
) -> None:
    """Print a group's messages as they arrive, until Ctrl-C."""
    profile = _profile(data, as_user)

    async def work() -> None:
        async with Client(profile, broker=broker) as client:
            if group not in client.groups:
                fail(f"{profile.user} is not in {group} (groups: {', '.join(client.groups)})")
            async for event in client.events():
                if isinstance(event, Message | Unreadable) and event.group != group:
                    continue
                if json_output:
                    sys.stdout.write(json.dumps(_event_json(event), sort_keys=True) + "\n")
                    sys.stdout.flush()
                else:
                    _print_event(event)

    _run(work)


async def _fetch(
    profile: DeviceProfile, broker: str | None, group: str, since: float | None
) -> None:
    """Fetch a group's older messages from the archiver into the profile's store."""
    try:
        client = Client(profile, broker=broker)
    except BusyError as exc:
        err_console.print(
            f"[bold yellow]not fetched:[/] {exc}; showing this device's local copy, "
            "which that process keeps up to date.",
            soft_wrap=True,
        )
        return
    async with client:
        try:
            async with asyncio.timeout(30):
                await client.fetch_history(group, since=since)
        except TimeoutError:
            err_console.print(
                "[bold yellow]not fetched:[/] the archiver did not answer within 30 s; "
                "showing this device's local copy.",
                soft_wrap=True,
            )
            return
        # Keys this device lacked are on their way from their senders: a moment.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                async for _ in client.events():
                    if not client.session.pending:
                        break


def history(
    group: GroupArgument,
    as_user: AsUserOption = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Only messages newer than this (2d, 12h).")
    ] = None,
    search: Annotated[
        str | None, typer.Option("--search", help="Only messages with all these words.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 200,
    fetch: Annotated[
        bool,
        typer.Option(
            "--fetch", help="First fetch older messages from the archiver (needs the broker)."
        ),
    ] = False,
    broker: BrokerOption = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Show a group's messages from this device's local store (searchable, end-to-end).

    With --fetch, older messages are fetched from the archiver first, decrypted on this device
    (asking their senders for keys it lacks) and added to the store.
    """
    profile = _profile(data, as_user)
    try:
        cutoff = None if since is None else time.time() - parse_duration(since)
    except MeshchatError as exc:
        fail(f"--since: {exc}", code=2)
    if fetch:
        _run(lambda: _fetch(profile, broker, group, cutoff))
    dept, _, name = group.partition("/")
    topic = f"mc/{profile.org}/{dept}/{name}"
    with ClientStore(profile.store_path) as store:
        try:
            found = (
                store.search(search, group_topic=topic, since=cutoff, limit=limit)
                if search
                else store.history(topic, since=cutoff, limit=limit)
            )
        except ValueError as exc:
            fail(f"--search: {exc}", code=2)
    if json_output:
        emit_json([_stored_json(m) for m in found])
        return
    if not found:
        console.print(f"No messages in {group}{' matching ' + repr(search) if search else ''}.")
    for message in found:
        body = "[dim](recalled)[/]" if message.recalled else escape(message.body)
        edited = " [dim](edited)[/]" if message.edited_at else ""
        console.print(
            f"[dim]{_clock(message.ts)}[/] [bold]{escape(message.sender)}[/]: {body}{edited}",
            soft_wrap=True,
        )


def _stored_json(message: StoredMessage) -> dict[str, object]:
    return {
        "id": f"{message.message_id[0]}:{message.message_id[1]}",
        "sender": message.sender,
        "device": message.device,
        "kind": Kind(message.kind).name.lower(),
        "ts": message.ts,
        "text": message.body,
        "edited": message.edited_at is not None,
        "recalled": message.recalled,
    }


MessageIdArgument = Annotated[
    str, typer.Argument(help="The urgent notice's id, CHAIN:INDEX (see `history --json`).")
]


def ack(
    group: GroupArgument,
    message: MessageIdArgument,
    as_user: AsUserOption = None,
    broker: BrokerOption = None,
    wait: Annotated[
        float, typer.Option("--wait", help="Seconds to wait for the broker before giving up.")
    ] = 15.0,
    data: DataOption = DEFAULT_DATA,
) -> None:
    """Acknowledge an urgent notice (its sender sees who has not)."""
    profile = _profile(data, as_user)
    target = _message_ref(message, "message id")
    assert target is not None

    inner = Inner(Kind.ACK, int(time.time()), (target,))
    delivered, _ = _run(lambda: _deliver(profile, broker, group, inner, wait))
    if not delivered:
        err_console.print(
            "[bold yellow]not sent yet:[/] the acknowledgement is queued and goes out with the "
            "next `meshchat send`, `tail` or `chat`.",
            soft_wrap=True,
        )
        raise typer.Exit(3)
    console.print(f"Acknowledged {message} in {group}.")


def acks(
    group: GroupArgument,
    message: MessageIdArgument,
    as_user: AsUserOption = None,
    broker: BrokerOption = None,
    catch_up: Annotated[
        float,
        typer.Option(
            "--catch-up", help="Seconds to collect acknowledgements waiting at the broker first."
        ),
    ] = 3.0,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """List who has not acknowledged an urgent notice yet."""
    profile = _profile(data, as_user)
    target = _message_ref(message, "message id")
    assert target is not None

    async def work() -> list[str] | None:
        try:
            client = Client(profile, broker=broker, send_receipts=False)
        except BusyError:  # the running client keeps the profile's store up to date
            with ClientStore(profile.store_path) as store:
                topic = group_topic(profile.org, saved_groups(store), profile.user, group)
                return store.unacknowledged(topic, target)
        async with client:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(catch_up):
                    async for _ in client.events():
                        pass
            return client.unacknowledged(group, target)

    missing = _run(work)
    if missing is None:
        fail(f"{message} is not an urgent notice in {group} on this device")
    if json_output:
        emit_json({"group": group, "id": message, "unacknowledged": missing})
    elif missing:
        console.print(f"Not acknowledged yet: {', '.join(missing)}")
    else:
        console.print("Everyone has acknowledged.")
