"""The meshchat error tree: every error the public API raises derives from `MeshchatError`.

```
MeshchatError
├── TopicError          a name, topic or topic filter is invalid (the message names the bad part)
├── EnvelopeError       an envelope cannot be encoded or decoded (malformed, oversize, unsupported)
├── ConfigError         a setting, a file or the data directory is unusable
└── BrokerError         the embedded broker cannot start or stop
    └── AddressInUseError   the port the broker should listen on is taken
```

Third-party exceptions are translated at the boundary with `raise ... from exc`, so callers catch
one tree. Errors carry the context a user needs to fix the problem in their message and as
attributes where a program may want to branch on it.
"""

from __future__ import annotations

__all__ = [
    "AddressInUseError",
    "BrokerError",
    "ConfigError",
    "EnvelopeError",
    "MeshchatError",
    "TopicError",
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


class ConfigError(MeshchatError):
    """A setting, an input file or the data directory cannot be used."""


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
