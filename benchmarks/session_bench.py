"""Session-saving benchmark: what a long-running reader writes per message read, in parts or whole.

Usage::

    .venv/bin/python benchmarks/session_bench.py [--quick] [--json PATH]

A client saves its E2EE session after every step. It now saves it in parts
(`DeviceSession.take_changes`, written by `meshchat.client._saved.save_session` under
``session/`` keys of its SQLite `ClientStore`); before, it wrote the whole state as one blob,
``store.put("session", session.to_bytes())``. Both are measured in the same run, on the same
session, after the same message:

1. a receiving device that holds N inbound chains (10 / 100 / 1,000; fewer with ``--quick``), each
   with S messages read (200; 50), built by real encryption and decryption: a few sender devices
   in a few groups, restarted between rounds so that each starts a new chain. Then, per
   repetition, one more message is read on one chain and the session saved both ways: CPU and
   wall milliseconds per save (`take_changes` or `to_bytes`, plus the SQLite transaction and its
   commit) and the bytes of the values written;
2. a restart at the largest N: `saved_session` from the parts beside `saved_session` from the
   blob (which is `DeviceSession.from_bytes`).

After the timed parts, the session restored from what was written must equal the live one
(`to_bytes` equal), else the benchmark exits 1. There is no budget (DESIGN.md section 8 has none
for this): the ratios say what parts cost against the whole blob. CPU is `time.process_time` of
this single process (SQLite runs in it); wall is `time.perf_counter` (it adds the syncs of each
commit). Every loop has a count and a time limit; tables show medians, the JSON every run.
See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgpack
from brokers import temporary_workdir
from clientkeys import E2EEOrg
from e2ee_bench import Series
from rich.console import Console
from rich.table import Table

from meshchat.client._saved import SESSION_KEY, SESSION_PREFIX, save_session, saved_session
from meshchat.client.store import ClientStore
from meshchat.e2ee import (
    BoxKeyPair,
    Decrypted,
    DeviceSession,
    Inner,
    Kind,
    Outgoing,
    SessionChanges,
    SigningKeyPair,
    Step,
)
from meshchat.topics import InboxTopic

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

DEFAULT_JSON: Final = Path(__file__).resolve().parent / "results" / "session.json"
ORG: Final = "acme"
READER: Final = "reader"
"""The receiving device (and its user): the session measured."""
PARTS: Final = "parts"
WHOLE: Final = "whole"
METHODS: Final = (PARTS, WHOLE)
_CHAIN_PREFIX: Final = "chain:"
EQUAL: Final = "equal"
STATE_FIELDS: Final = (
    "version",
    "user",
    "device",
    "pins",
    "key records",
    "rosters",
    "member since",
    "rotate",
    "sent chains",
    "inbound chains",
    "pending",
    "pending inbox",
    "requested",
    "revoked",
)
"""The top-level fields of `DeviceSession.to_bytes`, in order (`session._full_state`)."""


@dataclass(frozen=True, slots=True)
class Params:
    """Counts and limits of one run."""

    chain_counts: tuple[int, ...] = (10, 100, 1000)
    """Inbound chains the reader holds at each measurement (it grows from one to the next)."""
    seen: int = 200
    """Messages read per chain: its seen set."""
    senders: int = 8
    groups: int = 4
    """Every sender and the reader are members of every group. A reader keeps at most 64
    chains per sender and group (`MAX_READ_CHAINS`), so N chains need N / 64 pairs at least."""
    reps: int = 25
    """Repetitions of one more message and both saves, per chain count."""
    restore_reps: int = 5
    limit_s: float = 10.0
    """No new repetition of one measurement starts after this many seconds (at least one runs)."""


QUICK: Final = Params(chain_counts=(10, 100, 300), seen=50, reps=7, restore_reps=3, limit_s=2.0)


class BuildError(RuntimeError):
    """The reader did not end up with the state the benchmark meant to build."""


class CountingSession(DeviceSession):
    """A `DeviceSession` that keeps what its last `take_changes` returned, to count the bytes."""

    last: SessionChanges | None = None

    def take_changes(self) -> SessionChanges:
        """What changed, as `DeviceSession.take_changes`; remembered in `last`."""
        changes = super().take_changes()
        self.last = changes
        return changes


# --- the traffic that builds the reader's state --------------------------------------------------


class Traffic:
    """One reading device and a few senders in a few groups; the reader gets every message.

    The org is the client benchmark's (`clientkeys.E2EEOrg`: real keys, signed key records and
    rosters; each device is its own user). Each round, each (sender, group) pair of the round
    sends S messages on a new chain; the reader installs the chain from its distribution and
    reads them, interleaved. Between rounds the senders restart (`to_bytes` and `from_bytes`): a
    restored session never reuses an outbound chain, so the next round starts new ones.
    """

    def __init__(self, params: Params, now: int) -> None:
        """The org, its signed records and rosters, and every device's session fed with them."""
        self.org = E2EEOrg(ORG)
        self.now = now
        self.groups = tuple(f"mc/{ORG}/ops/line-{n + 1}" for n in range(params.groups))
        names = [f"sender-{n + 1}" for n in range(params.senders)]
        members = [READER, *names]
        self._records = {name: self.org.record(name) for name in members}
        self._rosters = {group: self.org.roster(group, members, now) for group in self.groups}
        device = self.org.device(READER)
        self.reader = CountingSession(
            trust=self.org.trust,
            user=READER,
            device=READER,
            signing=SigningKeyPair(device.seed),
            box=BoxKeyPair(device.box),
        )
        self._feed(self.reader)
        self.senders = {
            name: self._feed(self.org.device(name).session(self.org.trust)) for name in names
        }
        # Sender-major, so that a partial round still spans every group.
        self.pairs = [(sender, group) for sender in names for group in self.groups]
        self.inbox = InboxTopic(ORG, READER).topic
        self.chains = 0
        self.sent = 0
        self.read = 0

    def _feed(self, session: DeviceSession) -> DeviceSession:
        steps = [session.on_key_record(user, record) for user, record in self._records.items()]
        steps += [session.on_roster(group, roster) for group, roster in self._rosters.items()]
        for step in steps:
            if step.events:
                raise BuildError(f"{session.device} refused its keys: {step.events[0]}")
        return session

    def _restart_senders(self) -> None:
        for name in list(self.senders):
            device = self.org.device(name)
            self.senders[name] = DeviceSession.from_bytes(
                self.senders[name].to_bytes(),
                trust=self.org.trust,
                signing=SigningKeyPair(device.seed),
                box=BoxKeyPair(device.box),
            )

    def _check(self, step: Step) -> None:
        for event in step.events:
            if not isinstance(event, Decrypted):
                raise BuildError(f"the reader did not read a message: {event}")
            self.read += 1
        if step.outgoing:
            raise BuildError(f"the reader wants to publish: {step.outgoing[0].topic}")

    def _deliver(self, item: Outgoing) -> None:
        if item.topic == self.inbox:
            self._check(self.reader.on_inbox(item.payload))
        elif item.topic in self.groups:
            self._check(self.reader.on_group_message(item.topic, item.payload))
        # Anything else is another sender's inbox: the senders do not read one another.

    def send(self, sender: str, group: str) -> float:
        """One message from `sender` to `group`, read by the reader; the read's CPU seconds."""
        self.sent += 1
        inner = Inner(Kind.TEXT, self.now, (f"status {self.sent}: line clear, crew on site",))
        outgoing = self.senders[sender].encrypt(group, inner, now=self.now)
        started = time.process_time()
        for item in outgoing:
            self._deliver(item)
        return time.process_time() - started

    def step(self) -> float:
        """One more message on the measured chain (the first pair's newest); the read's CPU s."""
        return self.send(*self.pairs[0])

    def grow(self, chains: int, seen: int, save: Callable[[], object]) -> None:
        """Read `seen` messages on each new chain until the reader holds `chains` chains.

        `save` runs after each step that installs a new chain, as the client saves after every
        step, and once after each round for the messages read since (a save per message would
        make the build take minutes).
        """
        for _ in range(chains):  # each round adds at least one chain
            if self.chains >= chains:
                break
            take = min(len(self.pairs), chains - self.chains)
            if self.chains:
                self._restart_senders()
            for first in [True] + [False] * (seen - 1):
                for sender, group in self.pairs[:take]:
                    self.send(sender, group)
                    if first:
                        save()
            save()
            self.chains += take


# --- measurements --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stores:
    """The two client stores, real SQLite files: the parts, and the whole-blob reference."""

    parts: ClientStore
    whole: ClientStore

    def of(self, method: str) -> ClientStore:
        """The store `method` writes to."""
        return self.parts if method == PARTS else self.whole


@dataclass(frozen=True, slots=True)
class Sample:
    """One save: CPU and wall seconds, bytes of the values written, how many values."""

    cpu: float
    wall: float
    written: int
    values: int


def save_parts(store: ClientStore, reader: CountingSession) -> Sample:
    """What the client does now: `save_session` (take_changes, one transaction, commit)."""
    cpu, wall = time.process_time(), time.perf_counter()
    save_session(store, reader)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    changes = reader.last
    assert changes is not None  # save_session took the changes
    return Sample(cpu, wall, sum(map(len, changes.parts.values())), len(changes.parts))


def save_whole(store: ClientStore, reader: CountingSession) -> Sample:
    """The reference, what the client did before: the whole state as one blob, one commit."""
    cpu, wall = time.process_time(), time.perf_counter()
    blob = reader.to_bytes()
    store.put(SESSION_KEY, blob)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Sample(cpu, wall, len(blob), 1)


SAVERS: Final[dict[str, Callable[[ClientStore, CountingSession], Sample]]] = {
    PARTS: save_parts,
    WHOLE: save_whole,
}


@dataclass(slots=True)
class SaveRow:
    """The saves at one chain count."""

    chains: int
    seen: int
    read_ms: Series = field(default_factory=Series)
    cpu_ms: dict[str, Series] = field(default_factory=lambda: {m: Series() for m in METHODS})
    wall_ms: dict[str, Series] = field(default_factory=lambda: {m: Series() for m in METHODS})
    bytes: dict[str, Series] = field(default_factory=lambda: {m: Series() for m in METHODS})
    values: dict[str, Series] = field(default_factory=lambda: {m: Series() for m in METHODS})
    state_bytes: int = 0
    """`to_bytes()` of the session after the last step."""
    stored_parts: int = 0
    stored_parts_bytes: int = 0
    """The parts in the store after the last step: how many, and their bytes."""
    restored: dict[str, str] = field(default_factory=dict)
    """Per store, `EQUAL` or how the restored session differs from the live one."""


def catch_up(stores: Stores, reader: CountingSession) -> None:
    """Save both ways, untimed: the blob of what the build made, the parts changed since."""
    for method, save in SAVERS.items():
        save(stores.of(method), reader)


def measure_saves(traffic: Traffic, stores: Stores, params: Params) -> SaveRow:
    """One more message on one chain, then both saves; alternating which goes first."""
    reader = traffic.reader
    catch_up(stores, reader)
    traffic.step()  # warm-up: first calls at this size
    catch_up(stores, reader)
    row = SaveRow(traffic.chains, params.seen)
    started = time.monotonic()
    for rep in range(params.reps):
        gc.collect()
        row.read_ms.runs.append(traffic.step() * 1000)
        for method in METHODS if rep % 2 == 0 else METHODS[::-1]:
            sample = SAVERS[method](stores.of(method), reader)
            row.cpu_ms[method].runs.append(sample.cpu * 1000)
            row.wall_ms[method].runs.append(sample.wall * 1000)
            row.bytes[method].runs.append(sample.written)
            row.values[method].runs.append(sample.values)
        if time.monotonic() - started > params.limit_s:
            break
    stored = stores.parts.get_prefixed(SESSION_PREFIX)
    held = sum(1 for name in stored if name.startswith(_CHAIN_PREFIX))
    if held != traffic.chains:
        raise BuildError(f"the reader holds {held} chains, not {traffic.chains}")
    row.state_bytes = len(reader.to_bytes())
    row.stored_parts = len(stored)
    row.stored_parts_bytes = sum(map(len, stored.values()))
    return row


def restore(store: ClientStore, reader: DeviceSession) -> DeviceSession:
    """The reader's session as a restarting client reads it from `store`."""
    session = saved_session(store, trust=reader.trust, signing=reader.signing, box=reader.box)
    if session is None:
        raise BuildError(f"nothing saved in {store.path}")
    return session


def check_restored(stores: Stores, reader: DeviceSession) -> dict[str, str]:
    """Whether the session restored from each store has the live one's state (`to_bytes`)."""
    live = reader.to_bytes()
    return {
        method: compare_state(live, restore(stores.of(method), reader).to_bytes())
        for method in METHODS
    }


def compare_state(live: bytes, restored: bytes) -> str:
    """`EQUAL`, or which fields of the `to_bytes` layout differ, and whether only in order."""
    if live == restored:
        return EQUAL
    mine, theirs = msgpack.unpackb(live), msgpack.unpackb(restored)
    layout = len(STATE_FIELDS)
    if not (
        isinstance(mine, list) and isinstance(theirs, list) and len(mine) == len(theirs) == layout
    ):
        return "differs: not the layout this benchmark knows"
    order, content = [], []
    for name, a, b in zip(STATE_FIELDS, mine, theirs, strict=True):
        if a == b:
            continue
        same_items = isinstance(a, list) and isinstance(b, list)
        if same_items and sorted(map(repr, a)) == sorted(map(repr, b)):
            order.append(name)
        else:
            content.append(name)
    found = [f"the content of {', '.join(content)}"] if content else []
    found += [f"only the order of {', '.join(order)}"] if order else []
    return "differs in " + "; ".join(found)


@dataclass(slots=True)
class RestoreRow:
    """A restart at one chain count: `saved_session` from the parts and from the blob."""

    chains: int
    cpu_ms: dict[str, Series] = field(default_factory=lambda: {m: Series() for m in METHODS})
    wall_ms: dict[str, Series] = field(default_factory=lambda: {m: Series() for m in METHODS})


def measure_restore(traffic: Traffic, stores: Stores, params: Params) -> RestoreRow:
    """Restore the reader from each store, alternating which goes first."""
    row = RestoreRow(traffic.chains)
    started = time.monotonic()
    for rep in range(params.restore_reps):
        for method in METHODS if rep % 2 == 0 else METHODS[::-1]:
            gc.collect()
            cpu, wall = time.process_time(), time.perf_counter()
            restore(stores.of(method), traffic.reader)
            row.wall_ms[method].runs.append((time.perf_counter() - wall) * 1000)
            row.cpu_ms[method].runs.append((time.process_time() - cpu) * 1000)
        if time.monotonic() - started > params.limit_s:
            break
    return row


# --- tables, JSON --------------------------------------------------------------------------------


def _ratio(mine: float, reference: float) -> str:
    return f"{mine / reference:.3f}x" if reference else "—"


def _kib(count: float) -> str:
    return f"{count / 1024:,.1f} KiB"


def save_table(rows: Sequence[SaveRow]) -> Table:
    """Table 1: per message read, the save in parts beside the whole blob."""
    table = Table(
        title=(
            "1. one more message read on one chain, then the session saved "
            "(CPU ms per save, median; no budget)"
        ),
        title_justify="left",
    )
    for column in (
        "chains x read",
        "state",
        "read ms",
        "parts ms",
        "whole ms",
        "parts/whole",
        "parts B/step",
        "whole B/step",
        "wall parts ms",
        "wall whole ms",
    ):
        table.add_column(column, justify="left" if column == "chains x read" else "right")
    for row in rows:
        cpu = {m: row.cpu_ms[m].median for m in METHODS}
        written = {m: row.bytes[m].median for m in METHODS}
        table.add_row(
            f"{row.chains:,} x {row.seen}",
            _kib(row.state_bytes),
            f"{row.read_ms.median:.3f}",
            f"{cpu[PARTS]:.3f}",
            f"{cpu[WHOLE]:.3f}",
            _ratio(cpu[PARTS], cpu[WHOLE]),
            f"{written[PARTS]:,.0f}",
            f"{written[WHOLE]:,.0f}",
            f"{row.wall_ms[PARTS].median:.3f}",
            f"{row.wall_ms[WHOLE].median:.3f}",
        )
    return table


def restore_table(row: RestoreRow, state_bytes: int) -> Table:
    """Table 2: a restart, `saved_session` from the parts beside from the blob."""
    table = Table(
        title=(
            f"2. restart: the session read back from the store, {row.chains:,} chains, "
            f"{_kib(state_bytes)} (median; no budget)"
        ),
        title_justify="left",
    )
    for column in ("clock", "from parts (from_parts)", "from the blob (from_bytes)", "parts/whole"):
        table.add_column(column, justify="left" if column == "clock" else "right")
    for label, series in (("CPU ms", row.cpu_ms), ("wall ms", row.wall_ms)):
        parts, whole = series[PARTS].median, series[WHOLE].median
        table.add_row(label, f"{parts:,.1f}", f"{whole:,.1f}", _ratio(parts, whole))
    return table


def _to_json(value: object) -> object:
    if isinstance(value, Series):
        return {"median": value.median, "runs": value.runs}
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _fields(row: SaveRow | RestoreRow) -> dict[str, object]:
    """A row's fields as they are: `asdict` would turn each `Series` into a bare dict."""
    return {name: getattr(row, name) for name in row.__dataclass_fields__}


def _machine(store: ClientStore) -> dict[str, object]:
    packages = {}
    for name in ("meshchat", "pynacl", "msgpack", "sqlite-utils"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    pragma = {
        name: store.db.execute(f"PRAGMA {name}").fetchone()[0]
        for name in ("journal_mode", "synchronous", "page_size", "wal_autocheckpoint")
    }
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "store_dir": tempfile.gettempdir(),
        "load_average_at_end": os.getloadavg(),
        "store_pragmas": pragma,
        "packages": packages,
    }


def document(
    *,
    params: Params,
    quick: bool,
    started: datetime,
    seconds: float,
    saves: Sequence[SaveRow],
    restart: RestoreRow,
    machine: dict[str, object],
) -> dict[str, Any]:
    """Everything measured and the ratios, as written to the JSON file."""
    ratios: dict[str, dict[str, float]] = {}
    for row in saves:
        ratios[f"save.{row.chains}"] = {
            "cpu parts/whole": row.cpu_ms[PARTS].median / row.cpu_ms[WHOLE].median,
            "wall parts/whole": row.wall_ms[PARTS].median / row.wall_ms[WHOLE].median,
            "bytes parts/whole": row.bytes[PARTS].median / row.bytes[WHOLE].median,
        }
    ratios[f"restore.{restart.chains}"] = {
        "cpu parts/whole": restart.cpu_ms[PARTS].median / restart.cpu_ms[WHOLE].median,
        "wall parts/whole": restart.wall_ms[PARTS].median / restart.wall_ms[WHOLE].median,
    }
    return {
        "benchmark": "session",
        "timestamp": started.isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1),
        "mode": "quick" if quick else "default",
        "machine": machine,
        "parameters": asdict(params)
        | {
            "org": ORG,
            "parts": "meshchat.client._saved.save_session (DeviceSession.take_changes)",
            "whole": f"ClientStore.put({SESSION_KEY!r}, DeviceSession.to_bytes())",
            "clock": "cpu: time.process_time of this process (SQLite runs in it); "
            "wall: time.perf_counter (adds the commit's syncs)",
        },
        "saves": {str(row.chains): _fields(row) for row in saves},
        "restore": _fields(restart),
        "ratios": ratios,
        "budgets": {},
        "budget_note": "none: DESIGN.md section 8 sets no budget for saving the session",
        "restored_equal": all(v == EQUAL for row in saves for v in row.restored.values()),
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write JSON ({DEFAULT_JSON})"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the reader, measure saves and a restart, check the saved state, print, write JSON."""
    args = _parse(argv)
    params = QUICK if args.quick else Params()
    # Piped output would wrap the tables at 80 columns; a log file is read wide.
    console = Console(width=None if sys.stdout.isatty() else 150)
    started = datetime.now(UTC)
    clock = time.monotonic()

    def progress(what: str) -> None:
        console.print(f"[dim]{time.monotonic() - clock:6.1f}s[/dim] {what}", highlight=False)

    traffic = Traffic(params, int(time.time()))
    saves: list[SaveRow] = []
    with (
        temporary_workdir() as tmp,
        ClientStore(Path(tmp) / PARTS / "client.db") as parts,
        ClientStore(Path(tmp) / WHOLE / "client.db") as whole,
    ):
        stores = Stores(parts, whole)
        for chains in params.chain_counts:
            progress(f"{chains:,} chains x {params.seen} messages read: building")
            traffic.grow(chains, params.seen, partial(save_session, parts, traffic.reader))
            progress(f"{chains:,} chains: {params.reps} messages, each saved both ways")
            row = measure_saves(traffic, stores, params)
            row.restored = check_restored(stores, traffic.reader)
            saves.append(row)
        progress(f"restart at {traffic.chains:,} chains: {params.restore_reps} restores each way")
        restart = measure_restore(traffic, stores, params)
        machine = _machine(parts)
    seconds = time.monotonic() - clock

    console.print()
    console.print(save_table(saves))
    console.print(restore_table(restart, saves[-1].state_bytes))
    console.print(
        f"No budget: DESIGN.md section 8 sets none for saving the session. ratio = parts / "
        f"whole blob, measured on the same session after the same message; below 1 is better. "
        f"CPU = time.process_time of this process; wall adds the syncs of each commit. "
        f"{traffic.read:,} messages read in all. Total {seconds:.1f} s.",
        style="dim",
        highlight=False,
    )
    failed = [(row.chains, m, v) for row in saves for m, v in row.restored.items() if v != EQUAL]
    for chains, method, verdict in failed:
        console.print(
            f"[red]✗ FAIL[/red]: at {chains:,} chains the session restored from the {method} "
            f"store is not the live one (to_bytes): it {verdict}",
            highlight=False,
        )
    if not failed:
        console.print(
            "[green]✓[/green] the session restored from the parts (and from the blob) equals "
            "the live one (to_bytes) at every chain count",
            highlight=False,
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            document(
                params=params,
                quick=args.quick,
                started=started,
                seconds=seconds,
                saves=saves,
                restart=restart,
                machine=machine,
            ),
            indent=2,
            default=_to_json,
        )
        + "\n"
    )
    console.print(f"wrote {args.json}", style="dim")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
