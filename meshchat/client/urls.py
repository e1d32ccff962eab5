"""Broker URLs: ``mqtt://``, ``mqtts://``, ``ws://`` and ``wss://``, checked before any connect."""

from __future__ import annotations

import string
import urllib.parse
from dataclasses import dataclass
from typing import Final, Literal

from meshchat.errors import ConfigError

__all__ = ["DEFAULT_BROKER_URL", "DEFAULT_PORTS", "DEFAULT_WS_PATH", "BrokerUrl", "UrlScheme"]

UrlScheme = Literal["mqtt", "mqtts", "ws", "wss"]

DEFAULT_BROKER_URL: Final = "mqtt://127.0.0.1:1883"
"""Where a client connects when neither the command line nor the profile names a broker."""
DEFAULT_PORTS: Final[dict[UrlScheme, int]] = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}
DEFAULT_WS_PATH: Final = "/mqtt"
"""The WebSocket path when the URL has none: the convention of Paho, Mosquitto and browsers."""

_HOST_CHARS: Final = frozenset(string.ascii_letters + string.digits + ".-_:")


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    """Where an MQTT broker listens and how to speak to it.

    Attributes:
        scheme: ``mqtt`` (TCP), ``mqtts`` (TLS), ``ws`` (WebSocket) or ``wss`` (secure WebSocket).
        host: a host name or an IP address (IPv6 without brackets).
        port: the TCP port.
        path: the WebSocket path (``/mqtt`` unless the URL says otherwise); empty for TCP.
    """

    scheme: UrlScheme
    host: str
    port: int
    path: str = ""

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        """Read a broker URL such as ``mqtt://127.0.0.1:1883`` or ``ws://host/mqtt``.

        The port defaults to 1883 (mqtt), 8883 (mqtts), 80 (ws) or 443 (wss). Credentials do not
        belong in a URL (URLs end up in logs and profiles); they are passed separately.

        Raises:
            ConfigError: the URL is not one a client can connect to; the message says why.
        """
        parts, shown = _split(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ConfigError(
                f"broker URL {shown!r}: the scheme {parts.scheme!r} is not supported; "
                "use mqtt://, mqtts://, ws:// or wss://"
            )
        return cls(
            scheme, _host(parts, shown), _port(parts, scheme, shown), _path(parts, scheme, shown)
        )

    @property
    def tls(self) -> bool:
        """Whether the connection is encrypted (``mqtts`` and ``wss``)."""
        return self.scheme in {"mqtts", "wss"}

    @property
    def websocket(self) -> bool:
        """Whether MQTT runs over a WebSocket (``ws`` and ``wss``)."""
        return self.scheme in {"ws", "wss"}

    def __str__(self) -> str:
        """The URL in its canonical form, for example ``mqtt://127.0.0.1:1883``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def _split(url: object) -> tuple[urllib.parse.SplitResult, str]:
    if not isinstance(url, str):
        raise ConfigError(f"a broker URL must be a string, not {type(url).__name__}")
    shown = url if len(url) <= 200 else url[:200] + "..."
    if not url:
        raise ConfigError("the broker URL is empty; for example mqtt://127.0.0.1:1883")
    if any(char.isspace() or not char.isprintable() for char in url):
        raise ConfigError(f"broker URL {shown!r} holds whitespace or control characters")
    if "://" not in url:
        raise ConfigError(
            f"broker URL {shown!r} has no scheme; write it as mqtt://{url} "
            "(or mqtts://, ws://, wss://)"
        )
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"broker URL {shown!r} cannot be read: {exc}") from exc
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"broker URL {parts.scheme}://...@{parts.netloc.rpartition('@')[2]} holds "
            "credentials; pass the user name and password separately, not in the URL"
        )
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ConfigError(f"broker URL {shown!r} has a query or a fragment; remove it")
    return parts, shown


def _host(parts: urllib.parse.SplitResult, shown: str) -> str:
    host = parts.hostname or ""
    if not host:
        raise ConfigError(f"broker URL {shown!r} has no host")
    if not set(host) <= _HOST_CHARS or (":" in host and not parts.netloc.startswith("[")):
        raise ConfigError(f"broker URL {shown!r}: {host!r} is not a host name or address")
    return host


def _port(parts: urllib.parse.SplitResult, scheme: UrlScheme, shown: str) -> int:
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(
            f"broker URL {shown!r}: the port is not a number between 1 and 65535"
        ) from None
    if port is None:
        if parts.netloc.endswith(":"):
            raise ConfigError(f"broker URL {shown!r} has an empty port")
        return DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise ConfigError(f"broker URL {shown!r}: the port {port} is outside 1..65535")
    return port


def _path(parts: urllib.parse.SplitResult, scheme: UrlScheme, shown: str) -> str:
    if scheme in {"mqtt", "mqtts"}:
        if parts.path not in {"", "/"}:
            raise ConfigError(
                f"broker URL {shown!r}: {scheme}:// takes no path (only ws:// and wss:// do)"
            )
        return ""
    return parts.path or DEFAULT_WS_PATH
