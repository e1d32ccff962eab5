"""`meshchat archive`: run the archiver alone; export, verify, retention and compliance reports."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.common import (
    DEFAULT_DATA,
    DataOption,
    JsonOption,
    VerboseOption,
    console,
    emit_json,
    err_console,
    fail,
    read_password_file,
    setup_logging,
)
from meshchat.archive import (
    ARCHIVE_FILE,
    DEFAULT_INBOX_RETENTION_DAYS,
    Archiver,
    ArchiveStore,
    ExportCheck,
    ExportHeader,
    compliance_report,
    compliance_since,
    export_group,
    plan_export,
    policies_of,
    record_run,
    run_retention,
    verify_archive,
    verify_export,
)
from meshchat.client.transport import Transport
from meshchat.client.urls import DEFAULT_BROKER_URL
from meshchat.datadir import DataDir
from meshchat.directory import DIRECTORY_FILE, Directory, DirectorySnapshot, DirectoryWatcher
from meshchat.directory.policy import ARCHIVE_SERVICE, SERVICE_PREFIX
from meshchat.directory.store import parse_group_path
from meshchat.errors import ConfigError, MeshchatError
from meshchat.timeutil import parse_days, parse_duration, parse_instant

__all__ = ["archive_app"]

archive_app = typer.Typer(invoke_without_command=True)


def _archive_file(data: Path) -> Path:
    return DataDir(data).path / ARCHIVE_FILE


@contextlib.contextmanager
def _open_store(data: Path) -> Iterator[ArchiveStore]:
    """The archive of a data directory; every meshchat error becomes one `error:` line."""
    try:
        with ArchiveStore(_archive_file(data), create=False) as store:
            yield store
    except MeshchatError as exc:
        fail(str(exc))


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


def _when(value: float | None) -> str:
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


# -- running the archiver ------------------------------------------------------------------------


def _org_of(data: Path, org: str | None) -> str:
    if org is not None:
        return org
    directory_file = DataDir(data).path / DIRECTORY_FILE
    if not directory_file.exists():
        fail(f"no directory in {DataDir(data).path}: name the org with --org", code=2)
    with Directory(directory_file) as directory:
        return directory.org


@contextlib.asynccontextmanager
async def _snapshots(data: Path) -> AsyncIterator[Callable[[], DirectorySnapshot | None]]:
    """The directory's live state when the data directory has one, else nothing."""
    directory_file = DataDir(data).path / DIRECTORY_FILE
    if not directory_file.exists():
        yield lambda: None
        return
    async with DirectoryWatcher(directory_file) as watcher:
        yield lambda: watcher.policy.snapshot


async def _run_archiver(
    data: Path,
    *,
    url: str,
    org: str,
    client_id: str,
    username: str | None,
    password: str | None,
    share: str | None,
    retention_interval: float,
    inbox_days: int | None,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    path = _archive_file(data)
    try:
        async with (
            _snapshots(data) as snapshot,
            Transport(
                url,
                client_id=client_id,
                username=username,
                password=password,
                clean_session=False,
            ) as transport,
        ):
            archiver = Archiver(
                path,
                transport,
                org=org,
                snapshot=snapshot,
                directory_file=DataDir(data).path / DIRECTORY_FILE if snapshot() else None,
                share=share,
                retention_interval=retention_interval,
                inbox_retention_days=inbox_days,
            )
            async with asyncio.TaskGroup() as tasks:
                running = tasks.create_task(archiver.run(), name="meshchat[archive].loop")
                ready = tasks.create_task(archiver.ready.wait(), name="meshchat[archive].ready")
                stopping = tasks.create_task(stop.wait(), name="meshchat[archive].stop")
                await asyncio.wait({running, ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if ready.done():
                    console.print(
                        f"meshchat archive: archiving org {org} from {transport.url} as "
                        f"{client_id} into {path}",
                        soft_wrap=True,
                    )
                    console.print("Press Ctrl-C to stop.")
                    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
                for task in (running, ready, stopping):
                    task.cancel()
            console.print("stopping ...")
        if transport.error is not None:
            raise transport.error
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    stats = archiver.stats
    console.print(
        f"stopped: {stats.stored} stored, {stats.duplicates} already held, "
        f"{stats.malformed} malformed dropped, {stats.requests} requests answered."
    )


@archive_app.callback()
def run(
    ctx: typer.Context,
    broker: Annotated[
        str, typer.Option("--broker", help="The MQTT broker to archive from.")
    ] = DEFAULT_BROKER_URL,
    org: Annotated[
        str | None,
        typer.Option("--org", help="The org to archive (default: the data directory's)."),
    ] = None,
    client_id: Annotated[
        str,
        typer.Option("--client-id", help="MQTT client id; the persistent session is kept by it."),
    ] = f"{SERVICE_PREFIX}{ARCHIVE_SERVICE}",
    username: Annotated[
        str | None, typer.Option("--username", help="MQTT user name (none: anonymous).")
    ] = None,
    password_file: Annotated[
        Path | None,
        typer.Option("--password-file", help="A file whose first line is the MQTT password."),
    ] = None,
    share: Annotated[
        str | None,
        typer.Option(
            "--share",
            help="Subscribe via $share/NAME/... so archivers split the load (external brokers).",
        ),
    ] = None,
    retention_every: Annotated[
        str, typer.Option("--retention-every", help="How often retention runs, e.g. 12h.")
    ] = "1d",
    inbox_retention: Annotated[
        str,
        typer.Option("--inbox-retention", help="How long inbox history is kept, e.g. 30d."),
    ] = f"{DEFAULT_INBOX_RETENTION_DAYS}d",
    data: DataOption = DEFAULT_DATA,
    verbose: VerboseOption = 0,
) -> None:
    """Run the archiver until Ctrl-C (no subcommand), or export, verify and report on the archive.

    Run alone against any broker (`meshchat up` runs one too), the archiver keeps a persistent
    session (QoS 1) and acknowledges each envelope only once it is committed to
    DATA/archive.db, so killing it loses nothing: the broker sends again what was not
    acknowledged, and it is stored once. It answers history and gap requests to members (from
    the directory in DATA, when there is one) and applies retention per group.
    """
    if ctx.invoked_subcommand is not None:
        return
    setup_logging(verbose)
    password = None if password_file is None else read_password_file(password_file)
    try:
        interval = float(parse_duration(retention_every))
        inbox_days = parse_days(inbox_retention)
        organisation = _org_of(data, org)
        with DataDir(data).lock("archive"):
            asyncio.run(
                _run_archiver(
                    data,
                    url=broker,
                    org=organisation,
                    client_id=client_id,
                    username=username,
                    password=password,
                    share=share,
                    retention_interval=interval,
                    inbox_days=inbox_days,
                )
            )
    except (MeshchatError, ExceptionGroup) as exc:
        found = _meshchat_error(exc)
        if found is None:
            raise
        fail(str(found))


def _meshchat_error(exc: BaseException) -> MeshchatError | None:
    """The first meshchat error in `exc` (task groups wrap what their tasks raise)."""
    if isinstance(exc, MeshchatError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _meshchat_error(inner)
            if found is not None:
                return found
    return None


# -- export --------------------------------------------------------------------------------------


@archive_app.command("export")
def export(
    group: Annotated[str, typer.Option("--group", help="The group, as DEPT/GROUP.")],
    out: Annotated[Path, typer.Option("--out", help="The JSON Lines file to write.")],
    since: Annotated[
        str | None,
        typer.Option("--since", help="From: 2d (ago), 2024-05-01 (UTC), or unix seconds."),
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="Up to (not including); same forms as --since.")
    ] = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Export a group's envelopes (with the org's key records) as JSON Lines, payload in base64.

    The file holds ciphertext only; `meshchat audit decrypt` reads it with the compliance key.
    """
    now = time.time()
    try:
        dept, name = parse_group_path(group)
        low = parse_instant(since, now=now) if since is not None else None
        high = parse_instant(until, now=now) if until is not None else None
    except (ConfigError, ValueError) as exc:
        fail(str(exc), code=2)
    with _open_store(data) as store:
        org = _org_from_store(store, data)
        header = ExportHeader(org, f"{dept}/{name}", low, high, now)
        plan = plan_export(store, header.group, since=low, until=high)
        tmp = out.with_name(out.name + ".partial")
        try:
            # Ciphertext only, but who wrote when is nobody else's business either: 0600.
            descriptor = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            with (
                _progress() as bar,
                open(descriptor, "w", encoding="utf-8") as stream,  # noqa: PTH123  # a descriptor, not a path
            ):
                task = bar.add_task(f"exporting {header.group}", total=plan.total)
                summary = export_group(
                    store,
                    stream,
                    header,
                    path=out,
                    progress=lambda n: bar.advance(task, n),
                    plan=plan,
                )
            tmp.replace(out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            fail(f"cannot write {out}: {exc.strerror or exc}")
    if json_output:
        emit_json(
            {
                "out": str(out),
                "group": header.group,
                "since": low,
                "until": high,
                "envelopes": summary.count,
                "key_records": summary.key_records,
                "compliance_copies": summary.copies,
                "group_envelopes": summary.group_envelopes,
            }
        )
        return
    console.print(
        f"exported {summary.group_envelopes} envelopes of {header.group} "
        f"({_when(low)} to {_when(high)}), {summary.copies} older compliance copies and "
        f"{summary.key_records} key records to {out}",
        soft_wrap=True,
    )


def _org_from_store(store: ArchiveStore, data: Path) -> str:
    """The org of the archive: the directory's, else the one its topics name."""
    directory_file = DataDir(data).path / DIRECTORY_FILE
    if directory_file.exists():
        with Directory(directory_file) as directory:
            return directory.org
    # The org most rows name: one tampered row cannot make every other row look foreign.
    row = store.conn.execute(
        "SELECT substr(topic, 4, instr(substr(topic, 4), '/') - 1) AS org FROM envelopes "
        "WHERE topic LIKE 'mc/%/%' GROUP BY org ORDER BY COUNT(*) DESC, org LIMIT 1"
    ).fetchone()
    if row is None or not row[0]:
        fail("the archive holds no envelope of any org and there is no directory to name one")
    return str(row[0])


# -- verify --------------------------------------------------------------------------------------


def _check_json(what: str, check: ExportCheck) -> dict[str, object]:
    return {"what": what, "ok": check.ok, "checked": check.checked, "problems": check.problems}


@archive_app.command("verify")
def verify(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="Export files to check (none: check the archive database)."),
    ] = None,
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Check the archive database, or export files, for integrity; exits 1 on any problem."""
    results: list[tuple[str, ExportCheck]] = []
    try:
        with _progress() as bar:
            if not files:
                with _open_store(data) as store:
                    # Every row is checked as the archive's org's, whatever its topic claims
                    # (an empty archive has no row to check and needs no org).
                    rows = store.count()
                    org = _org_from_store(store, data) if rows else ""
                    task = bar.add_task("checking the archive", total=rows)
                    check = verify_archive(store, org=org, progress=lambda n: bar.advance(task, n))
                    results.append((str(store.path), check))
            for path in files or []:
                task = bar.add_task(f"checking {path.name}", total=None)
                check = verify_export(path, progress=lambda n: bar.advance(task, n))  # noqa: B023  # used at once
                results.append((str(path), check))
    except MeshchatError as exc:
        fail(str(exc))
    bad = [what for what, check in results if not check.ok]
    if json_output:
        emit_json([_check_json(what, check) for what, check in results])
    else:
        for what, check in results:
            if check.ok:
                console.print(f"{what}: intact, {check.checked} envelopes checked.", soft_wrap=True)
                continue
            err_console.print(
                f"[bold red]{what}: {len(check.problems)} problem(s)[/]", soft_wrap=True
            )
            for problem in check.problems:
                err_console.print(f"  {problem}", soft_wrap=True, markup=False)
    if bad:
        raise typer.Exit(1)


# -- retention and compliance --------------------------------------------------------------------


@archive_app.command("retention")
def retention(
    inbox_retention: Annotated[
        str,
        typer.Option("--inbox-retention", help="How long inbox history is kept, e.g. 30d."),
    ] = f"{DEFAULT_INBOX_RETENTION_DAYS}d",
    data: DataOption = DEFAULT_DATA,
    json_output: JsonOption = False,
) -> None:
    """Apply every group's retention now (legal holds are never touched) and audit the run."""
    try:
        inbox_days = parse_days(inbox_retention)
    except ConfigError as exc:
        fail(str(exc), code=2)
    directory_file = DataDir(data).path / DIRECTORY_FILE
    if not directory_file.exists():
        fail(f"no directory in {DataDir(data).path}: retention needs the groups' policies")
    with _open_store(data) as store:
        try:
            with Directory(directory_file) as directory:
                policies = policies_of(directory.groups())
                report = run_retention(
                    store, policies, now=time.time(), inbox_retention_days=inbox_days
                )
                record_run(directory, report, actor=directory.default_actor())
        except MeshchatError as exc:
            fail(str(exc))
    if json_output:
        emit_json(report.as_dict())
        return
    deleted = ", ".join(f"{path}: {n}" for path, n in sorted(report.deleted.items()) if n)
    console.print(
        f"retention: deleted {report.total_deleted} envelopes ({deleted or 'none expired'}; "
        f"inboxes: {report.inbox_deleted}), file {report.freed_bytes} bytes smaller.",
        soft_wrap=True,
    )
    if report.held:
        console.print(f"on legal hold, untouched: {', '.join(sorted(report.held))}", soft_wrap=True)


@archive_app.command("compliance")
def compliance(data: DataOption = DEFAULT_DATA, json_output: JsonOption = False) -> None:
    """List chains with messages but no compliance copy where policy asks for one; exit 1 if any."""
    directory_file = DataDir(data).path / DIRECTORY_FILE
    if not directory_file.exists():
        fail(f"no directory in {DataDir(data).path}: the report needs the groups' policies")
    with _open_store(data) as store:
        try:
            with Directory(directory_file) as directory:
                since = compliance_since(directory.groups(), directory.audit_entries())
        except MeshchatError as exc:
            fail(str(exc))
        report = compliance_report(store, since)
    if json_output:
        emit_json(
            {
                "ok": report.ok,
                "groups": dict(sorted(report.since.items())),
                "chains_checked": report.checked,
                "missing": [
                    {
                        "group": chain.group_path,
                        "chain_id": chain.chain_id,
                        "messages": chain.messages,
                        "first_received": chain.first_received,
                        "last_received": chain.last_received,
                    }
                    for chain in report.missing
                ],
            }
        )
    elif report.ok:
        console.print(
            f"compliance: {report.checked} chains in {len(report.since)} groups, every one "
            "with its compliance copy."
        )
    else:
        table = Table("group", "chain", "messages", "first received (UTC)", "last received (UTC)")
        for chain in report.missing:
            table.add_row(
                chain.group_path,
                str(chain.chain_id),
                str(chain.messages),
                _when(chain.first_received),
                _when(chain.last_received),
            )
        console.print(table)
        console.print(
            f"{len(report.missing)} of {report.checked} chains have no compliance copy: "
            "the auditor cannot read their messages."
        )
    if not report.ok:
        raise typer.Exit(1)
