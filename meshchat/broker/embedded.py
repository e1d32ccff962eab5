"""The embedded MQTT broker: amqtt 0.12 behind a small, typed, async-context-manager wrapper."""

from __future__ import annotations

import enum
import errno
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Self

import amqtt.errors

from meshchat.broker.access import AccessGate
from meshchat.broker.core import DEFAULT_MAX_OFFLINE_QUEUE, MIN_TLS_VERSION, MeshchatBroker
from meshchat.broker.limits import DEFAULT_MAX_PAYLOAD
from meshchat.broker.persist import BROKER_STATE_FILE, BrokerStore
from meshchat.broker.plugins import is_loopback
from meshchat.errors import AddressInUseError, BrokerError, ConfigError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "BrokerSettings",
    "BrokerState",
    "EmbeddedBroker",
    "Listener",
    "Scheme",
    "TlsFiles",
]

logger = logging.getLogger(__name__)

Scheme = Literal["mqtt", "ws", "mqtts", "wss"]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A server certificate chain and its private key, both PEM files.

    Attributes:
        certfile: the server's certificate chain.
        keyfile: the server's private key.
        client_ca: CA certificates (PEM); when given, TLS clients must present a certificate
            signed by one of them, and clients without one are refused.
    """

    certfile: Path
    keyfile: Path
    client_ca: Path | None = None

    def server_context(self) -> ssl.SSLContext:
        """Load the files into a server context that speaks TLS 1.2 or newer only.

        Raises:
            ConfigError: a file is missing or unreadable, the key does not fit the certificate,
                or the client CA file holds no certificate.
        """
        files = [("certificate", self.certfile), ("key", self.keyfile)]
        if self.client_ca is not None:
            files.append(("client CA", self.client_ca))
        for what, path in files:
            if not path.is_file():
                raise ConfigError(f"TLS {what} file {path} does not exist or is not a file")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = MIN_TLS_VERSION
        try:
            context.load_cert_chain(self.certfile, self.keyfile)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"cannot load the TLS certificate {self.certfile} with the key {self.keyfile}: "
                f"{exc.strerror or exc}"
            ) from exc
        if self.client_ca is not None:
            try:
                context.load_verify_locations(self.client_ca)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(
                    f"cannot load the TLS client CA {self.client_ca}: {exc.strerror or exc}"
                ) from exc
            context.verify_mode = ssl.CERT_REQUIRED
        return context


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where and how the embedded broker listens.

    Attributes:
        host: the address every listener binds to (``127.0.0.1`` by default).
        port: plain MQTT over TCP; 0 picks a free port.
        ws_port: MQTT over WebSocket, or None for no WebSocket listener.
        tls: certificate and key; with them the broker also listens for MQTT over TLS and, when
            `ws_port` is set, secure WebSocket.
        tls_port: MQTT over TLS (8883 by default).
        wss_port: secure WebSocket; None means `ws_port` + 1 (or a free port when `ws_port` is 0).
        extra_plugins: more amqtt plugins, by dotted class path, with their configuration.
        max_payload: largest packet body a client may send (256 KiB); a client that sends
            a bigger one is disconnected, everyone else is served as before.
        max_offline_queue: messages kept for one session (while its client is away, or too slow
            to take them) before the oldest are dropped; the broker logs it once per session.
        state_dir: where the broker keeps its state (`BROKER_STATE_FILE`, created 0600 in the
            directory, which is created 0700 when missing): persistent sessions, their queued
            QoS 1 messages and retained messages survive a restart, even ``kill -9``, and a
            QoS 1 publish is acknowledged only once stored. None keeps it all in memory.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    ws_port: int | None = None
    tls: TlsFiles | None = None
    tls_port: int = 8883
    wss_port: int | None = None
    extra_plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_offline_queue: int = DEFAULT_MAX_OFFLINE_QUEUE
    max_payload: int = DEFAULT_MAX_PAYLOAD
    state_dir: Path | None = None

    def __post_init__(self) -> None:
        """Reject settings no listener could use, with the setting's name in the message."""
        if ":" in self.host:
            raise ConfigError(
                f"host {self.host!r}: IPv6 listen addresses are not supported by the embedded "
                "broker yet; use an IPv4 address or a host name"
            )
        for name in ("port", "ws_port", "tls_port", "wss_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ConfigError(f"{name.replace('_', '-')} {value} is outside 0..65535")
        if self.max_offline_queue < 1:
            raise ConfigError(f"max-offline-queue {self.max_offline_queue} must be at least 1")

    @property
    def loopback_only(self) -> bool:
        """Whether every listener is reachable from this machine only."""
        return self.host == "localhost" or is_loopback(self.host)

    def planned(self) -> list[tuple[str, Scheme, int]]:
        """The listeners to open, as (amqtt listener name, scheme, requested port)."""
        plan: list[tuple[str, Scheme, int]] = [("default", "mqtt", self.port)]
        if self.ws_port is not None:
            plan.append(("ws", "ws", self.ws_port))
        if self.tls is not None:
            plan.append(("tls", "mqtts", self.tls_port))
            if self.ws_port is not None:
                wss = self.wss_port
                if wss is None:
                    wss = 0 if self.ws_port == 0 else self.ws_port + 1
                plan.append(("wss", "wss", wss))
        return plan


@dataclass(frozen=True, slots=True)
class Listener:
    """A listener the broker has open."""

    scheme: Scheme
    host: str
    port: int

    @property
    def url(self) -> str:
        """The URL a client connects to, for example ``mqtt://127.0.0.1:1883``."""
        return f"{self.scheme}://{self.host}:{self.port}"


class BrokerState(enum.Enum):
    """Lifecycle of an `EmbeddedBroker`; it runs once and cannot be restarted."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


_AUTH_PLUGIN: Final = "meshchat.broker.plugins.LoopbackOnlyAuthPlugin"


class EmbeddedBroker:
    """The amqtt broker of a site server, as an async context manager.

    Example:
        ```python
        async with EmbeddedBroker(BrokerSettings(port=0)) as broker:
            print(broker.listeners[0].url)
        ```

    Until the directory brings authentication, clients connect without credentials and only from
    loopback addresses (`meshchat.broker.plugins.LoopbackOnlyAuthPlugin`).
    """

    def __init__(
        self, settings: BrokerSettings | None = None, *, access: AccessGate | None = None
    ) -> None:
        """Prepare a broker; nothing listens until it is entered or `start` is awaited.

        Args:
            settings: where and how to listen.
            access: authentication and topic ACL from the directory; without it the broker
                accepts anonymous clients from loopback addresses only.
        """
        self.settings = settings or BrokerSettings()
        self.access = access
        self._state = BrokerState.NEW
        self._broker: Any = None
        self._store: BrokerStore | None = None
        self._listeners: list[Listener] = []

    @property
    def state(self) -> BrokerState:
        """Where the broker is in its lifecycle."""
        return self._state

    @property
    def listeners(self) -> list[Listener]:
        """The open listeners, with the ports actually bound (useful with port 0)."""
        return list(self._listeners)

    def listener(self, scheme: Scheme) -> Listener:
        """The open listener of one scheme.

        Raises:
            BrokerError: the broker has no such listener.
        """
        for candidate in self._listeners:
            if candidate.scheme == scheme:
                return candidate
        raise BrokerError(f"the broker has no {scheme} listener")

    def _config(self) -> dict[str, Any]:
        settings = self.settings
        listeners: dict[str, dict[str, Any]] = {}
        for name, scheme, port in settings.planned():
            entry: dict[str, Any] = {
                "type": "ws" if scheme in {"ws", "wss"} else "tcp",
                "bind": f"{settings.host}:{port}",
                "max_connections": 0,
            }
            if scheme in {"mqtts", "wss"} and settings.tls is not None:
                entry |= {
                    "ssl": True,
                    "certfile": str(settings.tls.certfile),
                    "keyfile": str(settings.tls.keyfile),
                }
                if settings.tls.client_ca is not None:
                    entry["cafile"] = str(settings.tls.client_ca)
            listeners[name] = entry
        plugins: dict[str, dict[str, Any]] = (
            self.access.plugin_config() if self.access is not None else {_AUTH_PLUGIN: {}}
        )
        plugins |= settings.extra_plugins
        return {"listeners": listeners, "plugins": plugins, "timeout_disconnect_delay": 0}

    async def start(self) -> None:
        """Open every listener.

        Raises:
            AddressInUseError: a port is taken; no listener stays open.
            ConfigError: the TLS files or the state directory cannot be used.
            BrokerError: amqtt failed to start for another reason, or this broker ran before.
        """
        if self._state is not BrokerState.NEW:
            raise BrokerError(
                f"this broker is {self._state.value}; create a new one to start again"
            )
        self._state = BrokerState.STARTING
        if self.settings.tls is not None:
            self.settings.tls.server_context()  # fail early, with a clear message
        try:
            self._store = await self._open_store()
            self._broker = MeshchatBroker(
                self._config(),
                max_offline_queue=self.settings.max_offline_queue,
                max_payload=self.settings.max_payload,
                topic_check=self.access.check if self.access is not None else None,
                store=self._store,
            )
            await self._broker.start()
        except amqtt.errors.BrokerError as exc:
            await self._close_partial_start()
            self._state = BrokerState.STOPPED
            raise self._translate(exc) from exc
        except BaseException:
            await self._close_partial_start()
            self._state = BrokerState.STOPPED
            raise
        self._listeners = self._bound_listeners()
        self._state = BrokerState.RUNNING
        for listener in self._listeners:
            logger.info("listening on %s", listener.url)

    async def _open_store(self) -> BrokerStore | None:
        state_dir = self.settings.state_dir
        if state_dir is None:
            return None
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"broker state directory {state_dir} is unusable: {exc.strerror or exc}"
            ) from exc
        store = BrokerStore(
            state_dir / BROKER_STATE_FILE, max_queue=self.settings.max_offline_queue
        )
        await store.open()
        return store

    def _bound_listeners(self) -> list[Listener]:
        servers = self._broker._servers  # noqa: SLF001  # amqtt exposes no public listener list
        bound: list[Listener] = []
        for name, scheme, _ in self.settings.planned():
            sockets = servers[name].instance.sockets
            port = int(sockets[0].getsockname()[1])
            bound.append(Listener(scheme, self.settings.host, port))
        return bound

    def _translate(self, exc: amqtt.errors.BrokerError) -> BrokerError:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            started = set(self._broker._servers) if self._broker else set()  # noqa: SLF001  # see _bound_listeners
            for name, scheme, port in self.settings.planned():
                if name not in started:
                    return AddressInUseError(
                        f"cannot listen for {scheme} on {self.settings.host}:{port}: "
                        "the address is already in use",
                        host=self.settings.host,
                        port=port,
                    )
        if isinstance(cause, OSError):
            return BrokerError(f"cannot open a listener: {cause.strerror or cause}")
        return BrokerError(f"the embedded broker failed to start: {exc}")

    async def _close_partial_start(self) -> None:
        """Close the listeners amqtt left open when a later one failed to start, and the store."""
        try:
            if self._broker is None:
                return
            for server in list(self._broker._servers.values()):  # noqa: SLF001  # see _bound_listeners
                await server.close_instance()
            await self._broker.plugins_manager.close()
        finally:
            if self._store is not None:
                await self._store.close()

    async def stop(self) -> None:
        """Disconnect every client and close every listener; a second call does nothing."""
        if self._state is not BrokerState.RUNNING:
            return
        self._state = BrokerState.STOPPING
        try:
            await self._broker.shutdown()
        finally:
            if self._store is not None:
                await self._store.close()  # after the broker: its last changes are committed
            self._state = BrokerState.STOPPED
            logger.info("broker stopped")

    async def disconnect(self, client_id: str) -> bool:
        """Drop a client's connection now (its last will is published); False if not connected.

        Used when the directory revokes the client's account or device.
        """
        if self._state is not BrokerState.RUNNING:
            return False
        entry = self._broker.sessions.get(client_id)
        if entry is None:
            return False
        session, handler = entry
        if not session.transitions.is_connected():
            return False
        logger.warning("disconnecting client %r: its credentials were revoked", client_id)
        await handler.handle_connection_closed()
        return True

    async def __aenter__(self) -> Self:
        """Start the broker."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the broker."""
        await self.stop()
