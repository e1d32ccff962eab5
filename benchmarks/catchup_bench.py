"""Catch-up benchmark: a device that was offline reads its missed messages over a 64 kbit/s link.

Usage::

    .venv/bin/python benchmarks/catchup_bench.py [--quick] [--json PATH]

A real site server (`meshchat.server.SiteServer`, durable, authentication and the topic ACL on)
runs in this process with two users in one group, each on a real `meshchat.client.Client`. The
receiver connects once (so its persistent session and subscriptions exist) and leaves; the
sender sends 2,000 texts of 20 bytes (200 with ``--quick``) and flushes, so the broker holds
them in the receiver's offline queue. The receiver then reconnects through a TCP proxy that
throttles both directions to 64 kbit/s (8,000 B/s, a token bucket per direction), and the
benchmark measures the wall time from that connect until every text has been decrypted and
reported as a `Message` event.

The budget (DESIGN.md section 8) is at most 1.3 x the link-rate limit: the bytes that crossed
the proxy downstream during the catch-up, divided by 8,000 B/s. The payloads alone (every text's
whole MQTT PUBLISH, measured on the sender's link) give a lower bound beside it. The proxy reads
the MQTT packets crossing it, so the table also says what else crossed in each direction. Every
wait has a deadline and the benchmark always exits 0. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
import os
import platform
import secrets
import string
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from brokers import temporary_workdir
from rich.console import Console
from rich.table import Table
from throttle import GAP_S, READ_BUFFER, SEGMENT, Direction, ThrottledProxy

from meshchat.broker import BrokerSettings
from meshchat.client import DeviceProfile
from meshchat.client.core import Client, Message
from meshchat.client.login import login
from meshchat.datadir import DataDir
from meshchat.directory import Directory, Role
from meshchat.e2ee import Kind
from meshchat.server import SiteServer

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

DEFAULT_JSON: Final = Path(__file__).resolve().parent / "results" / "catchup.json"
LINK_RATE: Final = 8_000
"""Bytes per second each way: 64 kbit/s."""
RATIO_BUDGET: Final = 1.3
"""DESIGN.md section 8: catch-up time <= 1.3 x the link-rate limit."""
ORG: Final = "acme"
GROUP: Final = "ops/line1"
SENDER: Final = "bob"
RECEIVER: Final = "carol"
ADMIN: Final = "root"
PASSWORDS: Final = {ADMIN: "root password", SENDER: "bob password", RECEIVER: "carol password"}
TEXT_LEN: Final = 20
PUBACK_LEN: Final = 4
TEXT_LABEL: Final = "a text"


@dataclass(frozen=True, slots=True)
class Params:
    """Counts and limits of one run."""

    messages: int = 2000
    """Texts sent while the receiver is offline."""
    send_deadline_s: float = 180.0
    """For the sender to have the broker acknowledge every text."""
    deadline_s: float = 240.0
    """For the catch-up, from the connect: over six times what the link rate dictates."""


QUICK: Final = Params(messages=200, send_deadline_s=60.0, deadline_s=60.0)


# --- the wire ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """What one catch-up measured."""

    messages: int
    received: int = 0
    elapsed_s: float | None = None
    """From the connect to the last text reported (None: the deadline passed first)."""
    first_s: float | None = None
    half_s: float | None = None
    down_bytes: int = 0
    up_bytes: int = 0
    text_publish_bytes: int = 0
    """The texts' whole PUBLISH packets, as the sender's link carried them."""
    text_publish_min: int = 0
    text_publish_max: int = 0
    down: dict[str, dict[str, int]] = field(default_factory=dict)
    up: dict[str, dict[str, int]] = field(default_factory=dict)
    after_close: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    """Both directions again once the receiver has closed: the tail after the last text."""
    first_publish_s: float | None = None
    """When the first text finished crossing the proxy, from the connect."""
    first_puback_s: float | None = None
    """When the first PUBACK reached the receiver (the one for its birth message)."""
    last_text_crossed_s: float | None = None
    """When the last text finished crossing the proxy, from the connect."""
    idle_s: float = 0.0
    """Seconds the downstream link stood idle between its first byte and the last text."""
    idle_gaps: list[tuple[float, float]] = field(default_factory=list)
    """(start from the connect, seconds) of the downstream idle gaps during the catch-up."""
    cpu_share: float | None = None
    """CPU of this process (server, both clients, proxy) over the catch-up, share of one core."""
    setup_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def link_limit_s(self) -> float:
        """Downstream bytes of the catch-up at the link rate."""
        return self.down_bytes / LINK_RATE

    @property
    def payload_limit_s(self) -> float:
        """The texts' PUBLISH packets alone at the link rate."""
        return self.text_publish_bytes / LINK_RATE


def _random_text() -> str:
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(TEXT_LEN))


def _prepare_directory(data: Path) -> None:
    with Directory(data / "directory.db") as directory:
        directory.init_org(ORG, admin=ADMIN, password=PASSWORDS[ADMIN])
        directory.add_user(ADMIN, SENDER, dept="ops", role=Role.MANAGER, password=PASSWORDS[SENDER])
        directory.add_user(
            ADMIN, RECEIVER, dept="ops", role=Role.MEMBER, password=PASSWORDS[RECEIVER]
        )
        directory.create_group(SENDER, GROUP)
        directory.add_members(SENDER, GROUP, [RECEIVER])


async def _login(clients: Path, url: str, user: str) -> DeviceProfile:
    return await login(
        clients / user,
        broker=url,
        org=ORG,
        user=user,
        password=PASSWORDS[user],
        device=f"{user}-laptop",
    )


async def _next_text(client: Client, text: str) -> None:
    async for event in client.events():
        if isinstance(event, Message) and event.text == text:
            return


async def _fill_queue(
    params: Params, port: int, sender: DeviceProfile, receiver: DeviceProfile, outcome: Outcome
) -> set[bytes]:
    """Receiver online once, then away while the sender sends; returns the texts' payloads."""
    loop = asyncio.get_running_loop()
    mark = loop.time()
    async with ThrottledProxy(port, rate=None) as sender_link:
        async with (
            Client(sender, broker=sender_link.url) as sending,
            Client(receiver, broker=f"mqtt://127.0.0.1:{port}") as receiving,
        ):
            # One text while both are online: each has the other's key record and the receiver
            # the sender's chain, so what follows is the steady state, not a first contact.
            async with asyncio.timeout(30):
                await sending.wait_roster(GROUP)
                await sending.send(GROUP, "warm-up")
                await _next_text(receiving, "warm-up")
        outcome.setup_s["warm_up"] = loop.time() - mark
        mark = loop.time()
        sender_link.reset()
        async with Client(sender, broker=sender_link.url) as sending:
            for _ in range(params.messages):
                await sending.send(GROUP, _random_text())
            async with asyncio.timeout(params.send_deadline_s):
                await sending.flush()
        outcome.setup_s["send_and_flush"] = loop.time() - mark
        tally = sender_link.up.tally
        texts = set(tally.group_payloads)
        sizes = [tally.publish_sizes[payload] for payload in texts]
    if len(texts) != params.messages:
        outcome.notes.append(f"the sender published {len(texts):,} group messages")
    outcome.text_publish_bytes = sum(sizes)
    outcome.text_publish_min, outcome.text_publish_max = min(sizes), max(sizes)
    return texts


@dataclass(slots=True)
class _Progress:
    """The receiver's texts as they are reported; the link's counts taken at the last one."""

    expected: int
    link: ThrottledProxy
    times: list[float] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    at_end: tuple[Direction, Direction] | None = None

    async def follow(self, client: Client) -> None:
        """Note when each of the sender's texts is reported, until all `expected` are."""
        loop = asyncio.get_running_loop()
        async for event in client.events():
            if (
                isinstance(event, Message)
                and event.group == GROUP
                and event.sender == SENDER
                and event.kind is Kind.TEXT
                and not event.history
            ):
                self.times.append(loop.time())
                if len(self.times) == self.expected:
                    # Counted now, before anything else runs: what crossed until this moment.
                    self.at_end = copy.deepcopy((self.link.down, self.link.up))
                    self.done.set()
                    return


async def _catch_up(
    params: Params, port: int, receiver: DeviceProfile, texts: set[bytes], outcome: Outcome
) -> None:
    """The receiver reconnects through the throttled proxy and reads what it missed."""
    loop = asyncio.get_running_loop()
    own: set[bytes] = set()

    def label_down(payload: bytes) -> str:
        if payload in texts:
            return TEXT_LABEL
        return "the receiver's own, echoed" if payload in own else "other"

    def label_up(payload: bytes) -> str:
        own.add(payload)
        return "the receiver's own (receipts)"

    async with ThrottledProxy(
        port, rate=LINK_RATE, label_down=label_down, label_up=label_up
    ) as link:
        progress = _Progress(params.messages, link)
        client = Client(receiver, broker=link.url)
        cpu = time.process_time()
        t0 = loop.time()
        async with asyncio.TaskGroup() as tasks:
            following = tasks.create_task(progress.follow(client), name="catchup[bench].follow")
            async with client:
                outcome.setup_s["client_entered"] = loop.time() - t0
                try:
                    async with asyncio.timeout_at(t0 + params.deadline_s):
                        await progress.done.wait()
                except TimeoutError:
                    outcome.notes.append(f"deadline of {params.deadline_s:g} s passed")
                end = progress.times[-1] if progress.done.is_set() else loop.time()
                outcome.cpu_share = (time.process_time() - cpu) / (loop.time() - t0)
                down, up = progress.at_end or copy.deepcopy((link.down, link.up))
                following.cancel()
        outcome.after_close = {"down": link.down.tally.snapshot(), "up": link.up.tally.snapshot()}
    outcome.down_bytes, outcome.up_bytes = down.crossed, up.crossed
    outcome.down, outcome.up = down.tally.snapshot(), up.tally.snapshot()
    outcome.idle_s = down.idle_s
    outcome.idle_gaps = [(start - t0, gap) for start, gap in down.gaps if start < end]
    outcome.first_publish_s = _since(t0, down.tally.first_seen.get(f"PUBLISH group: {TEXT_LABEL}"))
    outcome.first_puback_s = _since(t0, down.tally.first_seen.get("PUBACK"))
    outcome.last_text_crossed_s = _since(
        t0, down.tally.last_seen.get(f"PUBLISH group: {TEXT_LABEL}")
    )
    times = progress.times
    outcome.received = len(times)
    if times:
        outcome.first_s = times[0] - t0
        outcome.half_s = times[(len(times) - 1) // 2] - t0
    if progress.done.is_set():
        outcome.elapsed_s = end - t0
    else:
        outcome.notes.append(f"{params.messages - len(times):,} texts were not reported")


def _since(t0: float, moment: float | None) -> float | None:
    return None if moment is None else moment - t0


async def run_catchup(params: Params, workdir: Path, log: Callable[[str], None]) -> Outcome:
    """Set up the site and both users, fill the offline queue, measure the catch-up."""
    outcome = Outcome(params.messages)
    loop = asyncio.get_running_loop()
    data = workdir / "server"
    data.mkdir()
    started = loop.time()
    _prepare_directory(data)
    async with SiteServer(DataDir(data), BrokerSettings(port=0), org=ORG) as server:
        port = server.broker.listener("mqtt").port
        direct = f"mqtt://127.0.0.1:{port}"
        sender = await _login(workdir / "clients", direct, SENDER)
        receiver = await _login(workdir / "clients", direct, RECEIVER)
        outcome.setup_s["site_and_logins"] = loop.time() - started
        log(f"receiver online once, then away while the sender sends {params.messages:,} texts")
        texts = await _fill_queue(params, port, sender, receiver, outcome)
        log(f"catch-up of {params.messages:,} texts through the 64 kbit/s proxy")
        await _catch_up(params, port, receiver, texts, outcome)
    return outcome


# --- the table and the JSON ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    """The budget: catch-up time / link-rate limit."""

    value: float | None
    limit: float = RATIO_BUDGET
    judged: bool = True
    """False with ``--quick``: a smoke test, its setup weighs too much to judge."""

    @property
    def passed(self) -> bool | None:
        """Within budget (None: not measured, or not judged)."""
        if self.value is None or not self.judged:
            return None
        return self.value <= self.limit

    @property
    def mark(self) -> str:
        """The table's pass/fail cell."""
        if self.value is None:
            return "[red]✗ no result[/red]"
        if not self.judged:
            return "(not judged)"
        return "[green]✓ pass[/green]" if self.passed else "[red]✗ FAIL[/red]"


def _cell(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _ratio(mine: float | None, reference: float | None) -> float | None:
    return mine / reference if mine is not None and reference else None


def ratios(outcome: Outcome) -> dict[str, float | None]:
    """Measured / reference, per row of the table."""
    n = outcome.messages
    link_texts = LINK_RATE * n / outcome.text_publish_bytes if outcome.text_publish_bytes else None
    return {
        "time/link_limit": _ratio(outcome.elapsed_s, outcome.link_limit_s),
        "time/payload_limit": _ratio(outcome.elapsed_s, outcome.payload_limit_s),
        "down_bytes/payloads": _ratio(outcome.down_bytes, outcome.text_publish_bytes),
        "up_bytes/pubacks": _ratio(outcome.up_bytes, n * PUBACK_LEN),
        "texts_per_s/link": _ratio(
            n / outcome.elapsed_s if outcome.elapsed_s else None, link_texts
        ),
    }


def summary_table(outcome: Outcome, check: Check) -> Table:
    """The budget row and what it is made of, each beside its reference."""
    n = outcome.messages
    table = Table(
        title=f"catch-up of {n:,} missed 20-byte texts over a 64 kbit/s link (8,000 B/s each way)",
        title_justify="left",
    )
    for column in ("metric", "measured", "reference", "ratio", "budget", ""):
        table.add_column(column, justify="left" if column == "metric" else "right")
    ratio = ratios(outcome)
    mean_publish = outcome.text_publish_bytes / n
    rate = n / outcome.elapsed_s if outcome.elapsed_s else None
    rows: list[tuple[str, str, str, float | None, str, str]] = [
        (
            "catch-up time (s) / link-rate limit: downstream bytes ÷ 8,000 B/s",
            _cell(outcome.elapsed_s, 2),
            _cell(outcome.link_limit_s, 2),
            ratio["time/link_limit"],
            f"≤ {RATIO_BUDGET}",
            check.mark,
        ),
        (
            f"catch-up time (s) / the payloads alone: {n:,} whole PUBLISH ÷ 8,000 B/s",
            _cell(outcome.elapsed_s, 2),
            _cell(outcome.payload_limit_s, 2),
            ratio["time/payload_limit"],
            "",
            "",
        ),
        (
            "downstream bytes / the texts' PUBLISH packets (B)",
            f"{outcome.down_bytes:,}",
            f"{outcome.text_publish_bytes:,}",
            ratio["down_bytes/payloads"],
            "",
            "",
        ),
        (
            "downstream bytes per text / mean PUBLISH of a text (B)",
            f"{outcome.down_bytes / n:,.1f}",
            f"{mean_publish:,.1f}",
            ratio["down_bytes/payloads"],
            "",
            "",
        ),
        (
            "upstream bytes / a PUBACK per text (B)",
            f"{outcome.up_bytes:,}",
            f"{n * PUBACK_LEN:,}",
            ratio["up_bytes/pubacks"],
            "",
            "",
        ),
        (
            "texts reported per second / what the link carries",
            _cell(rate, 1),
            _cell(LINK_RATE / mean_publish if mean_publish else None, 1),
            ratio["texts_per_s/link"],
            "",
            "",
        ),
        (
            "first text reported after (s) / first text crossed the link",
            _cell(outcome.first_s, 2),
            _cell(outcome.first_publish_s, 2),
            None,
            "",
            "",
        ),
    ]
    for label, measured, reference, value, budget, mark in rows:
        table.add_row(label, measured, reference, _cell(value, 3), budget, mark)
    return table


def wire_table(outcome: Outcome) -> Table:
    """What crossed the proxy during the catch-up, by direction and packet kind."""
    table = Table(
        title="what crossed the link from the connect to the last text reported",
        title_justify="left",
    )
    for column in ("direction", "packet", "packets", "bytes", "share", "bytes per text"):
        table.add_column(column, justify="left" if column in {"direction", "packet"} else "right")
    for name, counts, total in (
        ("down (broker → receiver)", outcome.down, outcome.down_bytes),
        ("up (receiver → broker)", outcome.up, outcome.up_bytes),
    ):
        for at, (kind, count) in enumerate(counts.items()):
            table.add_row(
                "" if at else name,
                kind,
                f"{count['packets']:,}",
                f"{count['bytes']:,}",
                f"{count['bytes'] / total:.1%}" if total else "—",
                f"{count['bytes'] / outcome.messages:.2f}",
            )
        table.add_section()
    return table


def notes(outcome: Outcome) -> list[str]:
    """The lines under the tables: where the time went, what came after, what went wrong."""
    lines = [f"[red]note[/red]: {note}" for note in outcome.notes]
    gaps = ", ".join(f"{gap * 1000:.0f} ms at {start:.1f} s" for start, gap in outcome.idle_gaps)
    lines.append(
        f"downstream idle during the catch-up: {outcome.idle_s:.2f} s in all"
        + (f"; gaps over {GAP_S * 1000:.0f} ms: {gaps}" if gaps else "")
    )
    lines.append(
        f"the birth message's PUBACK came {_cell(outcome.first_puback_s, 2)} s after the connect "
        "(the client reads from the first byte regardless); `async with Client` returned after "
        f"{_cell(outcome.setup_s.get('client_entered'), 2)} s (it waits for the directory's "
        "answer, which queues behind the backlog)"
    )
    tail = {
        kind: count["bytes"] - outcome.down.get(kind, {}).get("bytes", 0)
        for kind, count in outcome.after_close.get("down", {}).items()
    }
    more = ", ".join(f"{kind} {size:,} B" for kind, size in tail.items() if size)
    lines.append(
        f"after the last text, until the receiver closed, {sum(tail.values()):,} B more came "
        f"down, queued behind the texts: {more or 'nothing'}"
    )
    if outcome.cpu_share is not None:
        lines.append(
            f"CPU of this process (site server, receiver, proxy) over the catch-up: "
            f"{outcome.cpu_share:.0%} of one core"
        )
    setup = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in outcome.setup_s.items())
    lines.append(f"setup: {setup}")
    return lines


def _machine() -> dict[str, object]:
    packages = {}
    for name in ("meshchat", "amqtt", "aiomqtt", "paho-mqtt", "pynacl"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "packages": packages,
    }


def document(
    *,
    params: Params,
    quick: bool,
    started: datetime,
    seconds: float,
    outcome: Outcome,
    check: Check,
) -> dict[str, Any]:
    """Everything measured, the ratios and the budget, as written to the JSON file."""
    return {
        "benchmark": "catchup",
        "timestamp": started.isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1),
        "mode": "quick" if quick else "default",
        "machine": _machine(),
        "parameters": asdict(params)
        | {
            "link_rate_bytes_per_s": LINK_RATE,
            "bucket_depth_and_segment_bytes": SEGMENT,
            "proxy_read_buffer_bytes": READ_BUFFER,
            "text_bytes": TEXT_LEN,
            "group": GROUP,
            "sender": SENDER,
            "receiver": RECEIVER,
            "site_server": "SiteServer(durable=True), in this process",
            "client": "Client defaults: send_receipts=True, window 20, QoS 1, clean_session=0",
            "clock": "asyncio loop time (monotonic), from the receiver's connect",
        },
        "results": asdict(outcome)
        | {
            "link_limit_s": outcome.link_limit_s,
            "payload_limit_s": outcome.payload_limit_s,
            "down_bytes_per_text": outcome.down_bytes / outcome.messages,
            "up_bytes_per_text": outcome.up_bytes / outcome.messages,
        },
        "ratios": ratios(outcome),
        "budgets": {
            "catchup_time_over_link_limit": {
                "value": check.value,
                "at_most": check.limit,
                "passed": check.passed,
            }
        },
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 messages: a smoke test")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write JSON ({DEFAULT_JSON})"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the tables, write the JSON; exit 0 whatever the result."""
    args = _parse(argv)
    params = QUICK if args.quick else Params()
    # Piped output would wrap the tables at 80 columns; a log file is read wide.
    console = Console(width=None if sys.stdout.isatty() else 150)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)
    started = datetime.now(UTC)
    clock = time.monotonic()

    def progress(what: str) -> None:
        console.print(f"[dim]{time.monotonic() - clock:6.1f}s[/dim] {what}", highlight=False)

    with temporary_workdir() as workdir:
        try:
            outcome = asyncio.run(run_catchup(params, Path(workdir), progress))
        except Exception as exc:  # noqa: BLE001  # the benchmark reports a failure, never raises
            outcome = Outcome(params.messages, notes=[f"the run failed: {exc!r}"])
    seconds = time.monotonic() - clock
    check = Check(_ratio(outcome.elapsed_s, outcome.link_limit_s), judged=not args.quick)
    doc = document(
        params=params,
        quick=args.quick,
        started=started,
        seconds=seconds,
        outcome=outcome,
        check=check,
    )
    console.print()
    console.print(summary_table(outcome, check))
    console.print(wire_table(outcome))
    for line in notes(outcome):
        console.print(line, style="dim", highlight=False)
    if check.passed is False:
        console.print(
            f"[red]missed[/red]: catch-up took {check.value:.3f} x the link-rate limit, "
            f"budget ≤ {RATIO_BUDGET}",
            highlight=False,
        )
    console.print(f"Total {seconds:.1f} s.", style="dim", highlight=False)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"wrote {args.json}", style="dim")
    return 0


if __name__ == "__main__":
    sys.exit(main())
