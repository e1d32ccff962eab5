"""History, gap and inbox requests on ``_s/archive/{user}``: who may ask, and the answers.

A request is the `meshchat.rpc` ``[op, id, args]``; the reply goes to
``_s/archive/{user}/reply``, which only that user may read. Operations:

``history [group, since, until, cursor, limit, newest_first]``
    A page of the group's messages received in [since, until) (unix seconds; nil for open
    ends), oldest first, or newest first with `newest_first`. Every argument after `group` may
    be left out.
``gap [group, chain_id, first, last, cursor]``
    A page of one chain's messages with indices first..last (at most `MAX_GAP_SPAN`), by index:
    what a device fetches to fill a gap in a chain. `cursor` may be left out.
``inbox [device, since, cursor, limit]``
    A page of what the device's inbox received since `since`: the chain distributions and
    sealed payloads a device needs when its broker session was lost. Only the device's owner
    may ask.

Each answer is ``[items, cursor]``: items are ``[id, received_at, etype, chain_id, index, size,
payload]`` (payload nil when the envelope alone is over the reply budget), and `cursor` is nil
on the last page, else what to send as `cursor` for the next one. A reply stays under
`meshchat.rpc.MAX_RPC_LEN` (64 KiB).

Only current members of a group get its history; a revoked user, a removed member and anyone
else get a refusal that says so. The decision is the access policy's
(`meshchat.directory.policy.AccessPolicy`) over a `DirectorySnapshot` (the broker's own
snapshot inside ``meshchat up``): whoever may read a group's topic may read its history.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final, Literal

from meshchat.archive.store import ArchiveStore, Cursor, Page
from meshchat.directory.policy import (
    AccessPolicy,
    Action,
    DirectorySnapshot,
    Principal,
    PrincipalKind,
)
from meshchat.directory.store import parse_group_path
from meshchat.errors import MeshchatError, TopicError
from meshchat.rpc import MAX_RPC_LEN, Request
from meshchat.topics import GroupTopic, validate_name

__all__ = [
    "ITEM_OVERHEAD",
    "MAX_GAP_SPAN",
    "MAX_PAGE_ITEMS",
    "REPLY_BUDGET",
    "Query",
    "RefusedError",
    "answer",
    "authorize",
]

MAX_PAGE_ITEMS: Final = 500
"""Items one page holds at most."""
ITEM_OVERHEAD: Final = 40
"""Bytes an item costs in a reply besides its payload, at most (msgpack headers and numbers)."""
REPLY_BUDGET: Final = MAX_RPC_LEN - 2048
"""Bytes of items one reply carries at most, leaving room for the reply's own framing."""
MAX_GAP_SPAN: Final = 1000
"""Indices one gap request may name: a chain rotates after 1000 messages."""
_MAX_U32: Final = 2**32 - 1

Op = Literal["history", "gap", "inbox"]


class RefusedError(MeshchatError):
    """A request the archive does not answer, with a message for the requester."""


@dataclass(frozen=True, slots=True)
class Query:
    """A checked request, allowed for its requester."""

    op: Op
    subject: str
    """The group path (history, gap) or the device (inbox)."""
    since: float | None = None
    until: float | None = None
    cursor: Cursor | None = None
    limit: int = MAX_PAGE_ITEMS
    newest_first: bool = False
    chain_id: int = 0
    first: int = 0
    last: int = 0


def _time(value: object, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:  # noqa: PLR0124  # NaN check
        raise RefusedError(f"{what} must be unix seconds or nil")
    return float(value)


def _cursor(value: object) -> Cursor | None:
    match value:
        case None:
            return None
        case [int() | float() as position, int(row)] if (
            not isinstance(position, bool) and not isinstance(row, bool) and 0 <= row < 2**63
        ):
            return (float(position), row)
    raise RefusedError("cursor must be nil or the [position, id] a previous page returned")


def _limit(value: object) -> int:
    if value is None:
        return MAX_PAGE_ITEMS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PAGE_ITEMS:
        raise RefusedError(f"limit must be 1 to {MAX_PAGE_ITEMS}")
    return value


def _u32(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_U32:
        raise RefusedError(f"{what} must be an integer in 0..{_MAX_U32}")
    return value


def _group(value: object) -> str:
    if not isinstance(value, str):
        raise RefusedError("the group must be written DEPT/GROUP")
    try:
        dept, name = parse_group_path(value)
    except TopicError as exc:
        raise RefusedError(str(exc)) from exc
    return f"{dept}/{name}"


def _parse(request: Request) -> Query:
    args = list(request.args)
    match request.op:
        case "history" if 1 <= len(args) <= 6:
            group, since, until, cursor, limit, newest = (args + [None] * 6)[:6]
            if newest is not None and not isinstance(newest, bool):
                raise RefusedError("newest_first must be true or false")
            return Query(
                "history",
                _group(group),
                since=_time(since, "since"),
                until=_time(until, "until"),
                cursor=_cursor(cursor),
                limit=_limit(limit),
                newest_first=bool(newest),
            )
        case "gap" if 4 <= len(args) <= 5:
            group, chain_id, first, last, cursor = [*args, None][:5]
            query = Query(
                "gap",
                _group(group),
                cursor=_cursor(cursor),
                chain_id=_u32(chain_id, "chain_id"),
                first=_u32(first, "first"),
                last=_u32(last, "last"),
            )
            if not 0 <= query.last - query.first < MAX_GAP_SPAN:
                raise RefusedError(f"a gap spans 1 to {MAX_GAP_SPAN} indices, first to last")
            return query
        case "inbox" if 1 <= len(args) <= 4:
            device, since, cursor, limit = (args + [None] * 4)[:4]
            try:
                validate_name(device, "device name")
            except TopicError as exc:
                raise RefusedError(str(exc)) from exc
            assert isinstance(device, str)
            return Query(
                "inbox",
                device,
                since=_time(since, "since"),
                cursor=_cursor(cursor),
                limit=_limit(limit),
            )
        case "history" | "gap" | "inbox":
            raise RefusedError(f"wrong number of arguments for {request.op!r}")
    raise RefusedError(
        f"the archive does not know {request.op[:32]!r}; it answers history, gap and inbox"
    )


def authorize(
    snapshot: DirectorySnapshot | None, user: str, request: Request, *, now: float
) -> Query:
    """Check a request and whether `user` may have its answer.

    Raises:
        RefusedError: malformed, or not allowed (the message says why, for the requester).
    """
    query = _parse(request)
    if snapshot is None:
        raise RefusedError("this archiver has no directory to check membership: it answers no one")
    # The policy the broker enforces decides, so history goes to exactly those who may read
    # the live topic. The client id plays no part in these checks (as in the Mosquitto ACL).
    policy = AccessPolicy(snapshot)
    person = Principal(PrincipalKind.USER, user, user)
    if not policy.still_valid(person):
        raise RefusedError(f"{user} is not an active user of {snapshot.org}")
    if query.op == "inbox":
        # An inbox is its device's alone: ask as a connection of that device would.
        if not policy.still_valid(replace(person, device=query.subject)):
            raise RefusedError(f"{query.subject} is not an active device of {user}")
        return query
    dept, name = query.subject.split("/")
    topic = GroupTopic(snapshot.org, dept, name).topic
    decision = policy.authorize(person, Action.RECEIVE, topic, now=now)
    if not decision:
        raise RefusedError(decision.reason)
    return query


def _encode(page: Page) -> list[object]:
    items = [
        [
            item.id,
            item.received_at,
            int(item.etype),
            item.chain_id,
            item.chain_index,
            item.size,
            None if item.id in page.oversize else item.payload,
        ]
        for item in page.items
    ]
    return [items, None if page.next is None else list(page.next)]


def answer(store: ArchiveStore, query: Query) -> list[object]:
    """The reply value of an authorized query (blocking: SQLite)."""
    budget = {"budget": REPLY_BUDGET, "overhead": ITEM_OVERHEAD}
    match query.op:
        case "history":
            page = store.history(
                query.subject,
                since=query.since,
                until=query.until,
                after=query.cursor,
                newest_first=query.newest_first,
                limit=query.limit,
                **budget,
            )
        case "gap":
            page = store.gap(
                query.subject,
                query.chain_id,
                query.first,
                query.last,
                after=query.cursor,
                limit=MAX_PAGE_ITEMS,
                **budget,
            )
        case "inbox":
            page = store.inbox(
                query.subject,
                since=query.since,
                after=query.cursor,
                limit=query.limit,
                **budget,
            )
    return _encode(page)
