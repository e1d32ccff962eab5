"""The meshchat error tree: every error the public API raises derives from `MeshchatError`.

```
MeshchatError
├── TopicError          a name, topic or topic filter is invalid (the message names the bad part)
├── EnvelopeError       an envelope cannot be encoded or decoded (malformed, oversize, unsupported)
│   └── TelemetryError      a device's status report or GPS fix fails its schema (field named)
├── ConfigError         a setting, a file or the data directory is unusable
│   └── BusyError           another process holds the data directory or device profile
├── BrokerError         the embedded broker cannot start or stop
│   └── AddressInUseError   the port the broker should listen on is taken
├── TransportError      the MQTT link cannot take or deliver a message (outbox full, closed, ...)
├── OrderError          a work order is unknown, or cannot move to the state asked for
├── E2EEError           end-to-end encryption refused a message or a key
│   ├── DecryptError            unknown chain, key not available, or authentication failed
│   ├── DuplicateMessageError   an identical redelivery of a message already read (drop it)
│   └── ReplayError             a different envelope for a (chain, index) already read
└── DirectoryError      the org directory refuses or cannot do what was asked
    ├── NotFoundError           no such org, department, user, group, site or device
    ├── AlreadyExistsError      the name is taken
    ├── PermissionDeniedError   the actor lacks a permission (named in the message)
    ├── AuthenticationError     wrong or revoked credentials
    ├── ImportFileError         an HR import file has a bad row (line number in the message)
    └── AuditChainError         the audit log was edited, reordered or cut (first bad row named)
```

Third-party exceptions are translated at the boundary with `raise ... from exc`, so callers catch
one tree. Errors carry the context a user needs to fix the problem in their message and as
attributes where a program may want to branch on it.
"""

from __future__ import annotations

__all__ = [
    "AddressInUseError",
    "AlreadyExistsError",
    "AuditChainError",
    "AuthenticationError",
    "BrokerError",
    "BusyError",
    "ConfigError",
    "DecryptError",
    "DirectoryError",
    "DuplicateMessageError",
    "E2EEError",
    "EnvelopeError",
    "ImportFileError",
    "MeshchatError",
    "NotFoundError",
    "OrderError",
    "PermissionDeniedError",
    "ReplayError",
    "TelemetryError",
    "TopicError",
    "TransportError",
]


class MeshchatError(Exception):
    """Root of every error meshchat raises on purpose."""


class TopicError(MeshchatError, ValueError):
    """A name, topic or topic filter is invalid.

    Attributes:
        part: what was being checked (for example ``"group name"`` or ``"topic filter"``).
        value: the offending value, as given.
    """

    def __init__(self, message: str, *, part: str = "", value: str = "") -> None:
        """Create the error; `part` and `value` say what was wrong."""
        super().__init__(message)
        self.part = part
        self.value = value


class EnvelopeError(MeshchatError, ValueError):
    """An envelope is malformed, oversize, of an unknown type or of an unsupported version."""


class TelemetryError(EnvelopeError):
    """A device's status report or GPS fix fails its schema.

    Attributes:
        field: the offending field (``"battery"``, ``"lat"``, ...), empty for the whole report.
    """

    def __init__(self, message: str, *, field: str = "") -> None:
        """Create the error; `field` names what was wrong."""
        super().__init__(message)
        self.field = field


class ConfigError(MeshchatError):
    """A setting, an input file or the data directory cannot be used."""


class BusyError(ConfigError):
    """Another process holds an exclusive lock: a data directory or a device profile."""

    def __init__(self, message: str, *, pid: int | None = None) -> None:
        """Create the error; `pid` is the holder's process id when it is known."""
        super().__init__(message)
        self.pid = pid


class BrokerError(MeshchatError):
    """The embedded broker cannot start, listen or stop."""


class AddressInUseError(BrokerError):
    """The address the broker should listen on is already taken.

    Attributes:
        host: the host that was asked for.
        port: the port that was asked for.
    """

    def __init__(self, message: str, *, host: str, port: int) -> None:
        """Create the error for `host`:`port`."""
        super().__init__(message)
        self.host = host
        self.port = port


class TransportError(MeshchatError):
    """The MQTT transport cannot take or deliver a message.

    A broker that refuses the credentials raises `AuthenticationError` instead, and one that
    refuses a subscription `PermissionDeniedError`: both are answers of the directory's policy.

    Attributes:
        reason: a short machine-readable reason (``"outbox-full"``, ``"too-large"``,
            ``"closed"``, ``"reused"``, ``"qos"``, ``"unsubscribed"``).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        """Create the error with its reason."""
        super().__init__(message)
        self.reason = reason


class OrderError(MeshchatError):
    """A work order is unknown here, or cannot move to the state asked for (the message says)."""


class DirectoryError(MeshchatError):
    """The org directory refuses or cannot do what was asked."""


class NotFoundError(DirectoryError, LookupError):
    """No such org, department, user, group, site or device."""


class AlreadyExistsError(DirectoryError):
    """The name is already taken."""


class PermissionDeniedError(DirectoryError, PermissionError):
    """The actor lacks a permission.

    Attributes:
        actor: who tried.
        permission: the permission that was missing, for example ``"group.create"``.
    """

    def __init__(self, message: str, *, actor: str, permission: str) -> None:
        """Create the error; the message names the missing permission."""
        super().__init__(message)
        self.actor = actor
        self.permission = permission


class AuthenticationError(DirectoryError):
    """Wrong, unknown or revoked credentials. The message never says which of them."""


class ImportFileError(DirectoryError):
    """An HR import file cannot be applied; nothing was written.

    Attributes:
        line: the 1-based line of the first bad row, or 0 when the file as a whole is bad.
    """

    def __init__(self, message: str, *, line: int = 0) -> None:
        """Create the error for `line`."""
        super().__init__(message)
        self.line = line


class AuditChainError(DirectoryError):
    """The audit log's hash chain is broken.

    Attributes:
        seq: the sequence number of the first bad row.
    """

    def __init__(self, message: str, *, seq: int) -> None:
        """Create the error for row `seq`."""
        super().__init__(message)
        self.seq = seq


class E2EEError(MeshchatError):
    """End-to-end encryption refused a message or a key."""


class DecryptError(E2EEError):
    """A message cannot be read: unknown chain, key not available, or it failed authentication.

    Attributes:
        reason: a short machine-readable reason (``"unknown-chain"``, ``"bad-signature"``,
            ``"bad-ciphertext"``, ``"key-unavailable"``, ``"too-far-ahead"``).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        """Create the error with its reason."""
        super().__init__(message)
        self.reason = reason


class DuplicateMessageError(E2EEError):
    """An identical redelivery of a message already read; drop it silently."""


class ReplayError(E2EEError):
    """A different envelope claims a (chain, index) that was already read: an attack or a bug."""
