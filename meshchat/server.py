"""The site server behind `meshchat up`: every service of one site in one asyncio process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import os
import secrets
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Self

from meshchat.archive import ARCHIVE_FILE, Archiver
from meshchat.broker import AccessGate, BrokerSettings, EmbeddedBroker, Listener
from meshchat.broker.access import ConnectLimit
from meshchat.client.transport import Transport
from meshchat.directory import DIRECTORY_FILE, AccessPolicy, Directory
from meshchat.directory.credentials import hash_token
from meshchat.directory.policy import (
    ARCHIVE_SERVICE,
    DIRECTORY_SERVICE,
    GEOFENCE_SERVICE,
    SERVICE_PREFIX,
)
from meshchat.directory.service import DirectoryService
from meshchat.directory.signing import OrgKeys, generate_passphrase
from meshchat.directory.watch import DirectoryWatcher
from meshchat.errors import ConfigError
from meshchat.geofence import GeofenceWorker

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from pathlib import Path
    from types import TracebackType

    from meshchat.datadir import DataDir

__all__ = ["DEFAULT_ORG", "RUNTIME_FILE", "Bootstrap", "NewOrgKeys", "SiteServer"]

logger = logging.getLogger(__name__)

RUNTIME_FILE: Final = "up.json"
"""Written while the server runs: its pid and listener URLs, for local clients and scripts."""
DEFAULT_ORG: Final = "demo"
BOOTSTRAP_ADMIN: Final = "admin"
BOOTSTRAP_DEPT: Final = "it"


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """The org and admin account a first run created; the password exists nowhere else."""

    org: str
    admin: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class NewOrgKeys:
    """The org keys a start created; the root passphrase exists nowhere else."""

    org: str
    fingerprint: str
    root_passphrase: str = field(repr=False)


class SiteServer:
    """Broker, directory, archiver and geofence worker on one data directory.

    An async context manager: entering locks the data directory, creates the org on a first
    run (and the org keys and identity keys that are missing), and starts every service;
    leaving stops them in reverse order and releases the lock.
    """

    def __init__(
        self,
        data: DataDir,
        broker: BrokerSettings | None = None,
        *,
        org: str = DEFAULT_ORG,
        anonymous: bool = False,
        connect_limit: ConnectLimit | None = None,
        durable: bool = True,
    ) -> None:
        """Prepare a server on `data`; nothing starts until it is entered.

        Args:
            data: the data directory.
            broker: where the broker listens.
            org: the org to create when the data directory has no directory yet.
            anonymous: no authentication or ACL: anonymous clients from loopback only.
            connect_limit: how often a client may connect (defaults: `ConnectLimit`).
            durable: the broker keeps its state (persistent sessions, their queued QoS 1
                messages, retained messages) in the data directory, unless `broker` names
                another ``state_dir``; False keeps it in memory only (lost on a restart).
        """
        self.data = data
        self.org = org
        self.anonymous = anonymous
        self.connect_limit = connect_limit
        self.bootstrap: Bootstrap | None = None
        self.new_keys: NewOrgKeys | None = None
        self.directory_service: DirectoryService | None = None
        self.archiver: Archiver | None = None
        self.geofence: GeofenceWorker | None = None
        # Tokens of meshchat's own services, made fresh on every start (the broker's policy
        # knows their hashes only).
        self._service_tokens = {
            DIRECTORY_SERVICE: secrets.token_urlsafe(24),
            ARCHIVE_SERVICE: secrets.token_urlsafe(24),
            GEOFENCE_SERVICE: secrets.token_urlsafe(24),
        }
        self.watcher: DirectoryWatcher | None = None
        settings = broker or BrokerSettings()
        if durable and settings.state_dir is None:
            settings = dataclasses.replace(settings, state_dir=data.path)
        self._broker_settings = settings
        self.broker = EmbeddedBroker(self._broker_settings)
        self._stack = AsyncExitStack()

    @property
    def listeners(self) -> list[Listener]:
        """Where the broker listens."""
        return self.broker.listeners

    @property
    def runtime_file(self) -> Path:
        """The file that tells local clients where this server listens."""
        return self.data.path / RUNTIME_FILE

    @property
    def directory_file(self) -> Path:
        """The directory database of this server."""
        return self.data.path / DIRECTORY_FILE

    def _bootstrap(self) -> None:
        """Create what a first run needs: the org and an admin, the org keys, identity keys.

        The org and an admin (with a random password) when the directory is empty; the org keys
        (with a random root passphrase) when the org has none; an identity key for every active
        user without one.
        """
        with Directory(self.directory_file) as directory:
            if not directory.initialized:
                password = secrets.token_urlsafe(12)
                directory.init_org(
                    self.org, admin=BOOTSTRAP_ADMIN, password=password, dept=BOOTSTRAP_DEPT
                )
                self.bootstrap = Bootstrap(self.org, BOOTSTRAP_ADMIN, password)
                logger.info("created org %s with admin %s", self.org, BOOTSTRAP_ADMIN)
            if OrgKeys.exists(self.data.path):
                keys = OrgKeys.open(self.data.path)
            else:
                passphrase = generate_passphrase()
                keys = OrgKeys.create(self.data.path, directory.org, passphrase)
                keys.audit_creation(directory)
                self.new_keys = NewOrgKeys(directory.org, keys.fingerprint, passphrase)
                logger.info("created the keys of org %s (root %s)", keys.org, keys.fingerprint)
            created = keys.ensure_identities(directory)
            if created:
                logger.info("created identity keys for %d user(s)", len(created))

    async def _on_policy(self, policy: AccessPolicy) -> None:
        gate = self.broker.access
        assert gate is not None
        for client_id in gate.update(policy):
            await self.broker.disconnect(client_id)

    async def __aenter__(self) -> Self:
        """Lock the data directory and start the services.

        Raises:
            ConfigError: the data directory is unusable or in use.
            BrokerError: the broker cannot listen (`AddressInUseError` when a port is taken).
            DirectoryError: the directory file cannot be used.
        """
        stack = self._stack
        try:
            stack.enter_context(self.data.lock())
            if not self.anonymous:
                # argon2id (the root passphrase) and SQLite are blocking: off the event loop.
                await asyncio.to_thread(self._bootstrap)
                self.watcher = await stack.enter_async_context(
                    DirectoryWatcher(
                        self.directory_file,
                        service_tokens={
                            name: hash_token(token) for name, token in self._service_tokens.items()
                        },
                    )
                )
                gate = AccessGate(self.watcher.policy, connect_limit=self.connect_limit)
                self.broker = EmbeddedBroker(self._broker_settings, access=gate)
                self.watcher.add_listener(self._on_policy)
            await stack.enter_async_context(self.broker)
            if not self.anonymous:
                await self._start_directory_service()
                await self._start_archive_service()
                await self._start_geofence_service()
            self._write_runtime_file()
            # Everything allocated so far lives as long as the server: keep it out of the
            # collector's full passes, which otherwise stall message routing for tens of ms.
            gc.freeze()
        except BaseException:
            await stack.aclose()
            raise
        return self

    def _service_url(self) -> str:
        """Where in-process services reach the broker: its first TCP listener, over loopback."""
        tcp = next((li for li in self.listeners if li.scheme == "mqtt"), None)
        if tcp is None:
            raise ConfigError("the broker needs a TCP listener for meshchat's own services")
        host = "127.0.0.1" if tcp.host in {"0.0.0.0", "", "::"} else tcp.host  # noqa: S104  # comparing, not binding
        return f"mqtt://{host}:{tcp.port}"

    async def _service_transport(self, name: str, *, persistent: bool) -> Transport:
        """A connection to the broker as the in-process service ``svc.NAME``."""
        return await self._stack.enter_async_context(
            Transport(
                self._service_url(),
                client_id=f"{SERVICE_PREFIX}{name}",
                username=f"{SERVICE_PREFIX}{name}",
                password=self._service_tokens[name],
                clean_session=not persistent,
            )
        )

    async def _run_service(
        self,
        what: str,
        work: Coroutine[object, object, None],
        ready: Coroutine[object, object, object] | None = None,
    ) -> None:
        """Run a service until the server stops; with `ready`, wait until it is ready first.

        A service that ends on its own is reported in one log line while the server runs on.

        Raises:
            ConfigError: the service failed before it was ready.
        """
        task = asyncio.create_task(work, name=f"meshchat[{what}]")
        task.add_done_callback(functools.partial(_report_end, what))

        async def stop() -> None:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        self._stack.push_async_callback(stop)
        if ready is None:
            return
        waiting = asyncio.create_task(ready, name=f"meshchat[{what}].ready")
        try:
            await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise ConfigError(f"the {what} could not start: {task.exception()}")

    async def _start_directory_service(self) -> None:
        """Answer clients on ``_s/dir`` and publish signed rosters and key records."""
        transport = await self._service_transport(DIRECTORY_SERVICE, persistent=False)
        watcher = self.watcher
        assert watcher is not None
        service = DirectoryService(self.data.path, transport, on_change=watcher.reload)
        self.directory_service = service

        async def changed(_policy: AccessPolicy) -> None:
            service.directory_changed()

        watcher.add_listener(changed)
        await self._run_service("directory service", service.run())

    async def _start_archive_service(self) -> None:
        """Archive the org's envelopes into ``DATA/archive.db`` and answer history requests.

        Its session is persistent (the client id stays ``svc.archive`` from run to run), so the
        broker keeps for it what arrives while the server is down, and nothing is acknowledged
        before it is committed. It is subscribed before `meshchat up` says it is ready, so
        nothing sent after that is missed.
        """
        self._stack.enter_context(self.data.lock("archive"))
        transport = await self._service_transport(ARCHIVE_SERVICE, persistent=True)
        watcher = self.watcher
        assert watcher is not None
        archiver = Archiver(
            self.data.path / ARCHIVE_FILE,
            transport,
            org=watcher.policy.snapshot.org,
            snapshot=lambda: watcher.policy.snapshot,
            directory_file=self.directory_file,
        )
        self.archiver = archiver
        await self._run_service("archiver", archiver.run(), archiver.ready.wait())

    async def _start_geofence_service(self) -> None:
        """Follow OwnTracks phones (and GPS telemetry) and keep the site channels' members.

        Its session is persistent (``svc.geofence``), so fixes sent while the server is down
        wait for it; memberships change through the directory and the watcher's policy.
        """
        self._stack.enter_context(self.data.lock("geofence"))
        transport = await self._service_transport(GEOFENCE_SERVICE, persistent=True)
        assert self.watcher is not None
        worker = GeofenceWorker(self.data.path, transport, on_change=self.watcher.reload)
        self.geofence = worker
        await self._run_service("geofence worker", worker.run(), worker.wait_ready())

    def _write_runtime_file(self) -> None:
        state = {"pid": os.getpid(), "listeners": [listener.url for listener in self.listeners]}
        tmp = self.runtime_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.runtime_file)
        self._stack.callback(self.runtime_file.unlink, missing_ok=True)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop every service and release the data directory."""
        await self._stack.aclose()


def _report_end(what: str, task: asyncio.Task[None]) -> None:
    """Say, in one line, why a service stopped while the server runs on."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("the %s stopped: %s", what, task.exception())
