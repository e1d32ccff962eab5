"""The device credential file that `meshchat device add` writes and the device SDK reads.

One JSON file, mode 0600, written atomically and never overwritten:

- ``org``, ``device`` (the device account's name: its MQTT user name and client id), ``dept``,
  ``kind`` and ``broker`` (the URL the admin gave; the SDK may be pointed elsewhere);
- ``group``: the device's dispatch group (``dept/name``): its people read the telemetry and
  send work orders;
- ``token``: the broker password of the device account;
- ``signing`` and ``box``: the device's Ed25519 and X25519 secrets (base64);
- ``trust``: the org's public trust bundle (base64), checked against ``fingerprint``;
- ``geofence``: the geofence worker's X25519 public key (base64), the one reader of fixes
  outside the device's dispatch groups; absent when the org has none.

Whoever holds the file can act as the device: copy it to the device over a channel you trust and
delete the admin's copy. A file others may read is refused, as ssh refuses such a key.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Self

from meshchat.e2ee import BoxKeyPair, OrgTrust, SigningKeyPair
from meshchat.errors import ConfigError, MeshchatError
from meshchat.files import fsync_directory, write_temporary
from meshchat.topics import validate_name

__all__ = ["CREDENTIALS_FORMAT", "DeviceCredentials"]

CREDENTIALS_FORMAT: Final = "meshchat-device/1"
_KEY_LEN: Final = 32


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{what} is not valid base64") from exc


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    """Everything a device needs to connect and to encrypt: login, keys, trust bundle."""

    org: str
    device: str
    dept: str
    kind: str
    broker: str
    group: str
    token: str = field(repr=False)
    signing: SigningKeyPair = field(repr=False)
    box: BoxKeyPair = field(repr=False)
    trust: OrgTrust
    geofence: bytes | None = None

    def __post_init__(self) -> None:
        """Check names, key lengths and that the trust bundle is the org's.

        Raises:
            ConfigError: something does not fit.
        """
        try:
            for value, what in (
                (self.org, "org name"),
                (self.device, "device name"),
                (self.dept, "department"),
                (self.kind, "device kind"),
            ):
                validate_name(value, what)
            dept, _, name = self.group.partition("/")
            validate_name(dept, "dispatch group department")
            validate_name(name, "dispatch group name")
        except MeshchatError as exc:
            raise ConfigError(f"device credentials: {exc}") from exc
        if self.trust.org != self.org:
            raise ConfigError(
                f"device credentials: the trust bundle is org {self.trust.org!r}, not {self.org!r}"
            )
        if self.geofence is not None and len(self.geofence) != _KEY_LEN:
            raise ConfigError("device credentials: the geofence key must be 32 bytes")
        if not self.token:
            raise ConfigError("device credentials: the broker token is empty")

    @property
    def fingerprint(self) -> str:
        """The org root's fingerprint (compare it with the one the admin announced)."""
        return self.trust.fingerprint

    def to_json(self) -> str:
        """The file's text (it holds secrets)."""
        record: dict[str, object] = {
            "format": CREDENTIALS_FORMAT,
            "org": self.org,
            "device": self.device,
            "dept": self.dept,
            "kind": self.kind,
            "broker": self.broker,
            "group": self.group,
            "fingerprint": self.fingerprint,
            "token": self.token,
            "signing": _b64(self.signing.seed),
            "box": _b64(self.box.secret),
            "trust": _b64(self.trust.encode()),
        }
        if self.geofence is not None:
            record["geofence"] = _b64(self.geofence)
        return json.dumps(record, indent=2) + "\n"

    def write(self, path: Path) -> None:
        """Write the file: mode 0600, atomically, never over an existing file.

        Raises:
            ConfigError: the file exists or cannot be written.
        """
        path = Path(path)
        tmp: Path | None = None  # written by write_temporary, linked, then always removed
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = write_temporary(path, self.to_json().encode("utf-8"))
            # link() refuses an existing target, where rename() would replace it.
            os.link(tmp, path)
            fsync_directory(path.parent)
        except FileExistsError as exc:
            raise ConfigError(
                f"{path} already exists; device credentials are never overwritten"
            ) from exc
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = "device credentials") -> Self:
        """Parse the file's text.

        Raises:
            ConfigError: it is not a credential file of this format, or it is damaged.
        """
        try:
            record = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{source} is not JSON: {exc}") from exc
        if not isinstance(record, dict) or record.get("format") != CREDENTIALS_FORMAT:
            raise ConfigError(f"{source} is not a meshchat device credential file")
        try:
            trust = OrgTrust.decode(_unb64(record["trust"], "trust"))
            geofence = record.get("geofence")
            credentials = cls(
                org=str(record["org"]),
                device=str(record["device"]),
                dept=str(record["dept"]),
                kind=str(record["kind"]),
                broker=str(record["broker"]),
                group=str(record["group"]),
                token=str(record["token"]),
                signing=SigningKeyPair(_unb64(record["signing"], "signing")),
                box=BoxKeyPair(_unb64(record["box"], "box")),
                trust=trust,
                geofence=None if geofence is None else _unb64(geofence, "geofence"),
            )
        except KeyError as exc:
            raise ConfigError(f"{source} lacks {exc.args[0]!r}") from exc
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        except MeshchatError as exc:
            raise ConfigError(f"{source} is damaged: {exc}") from exc
        if record.get("fingerprint") != credentials.fingerprint:
            raise ConfigError(f"{source}: the fingerprint does not match its trust bundle")
        return credentials

    @classmethod
    def load(cls, path: Path | str) -> Self:
        """Read a credential file.

        Raises:
            ConfigError: missing, readable by others, or damaged.
        """
        path = Path(path)
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                raise ConfigError(
                    f"{path} is open to other users (mode {mode:o}); it holds the device's "
                    f"keys: run `chmod 600 {path}`"
                )
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise ConfigError(f"no device credential file {path}") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        return cls.from_json(text, source=str(path))
