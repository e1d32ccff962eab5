"""Device profiles: what `meshchat login` leaves on a client machine, one per user.

``DATA/profiles/{user}/`` (mode 0700) holds:

- ``profile.json``: org, user, device name, broker URL and the org root's fingerprint;
- ``keys/``: a `KeyStore` with the device's Ed25519 and X25519 secrets and its broker token
  (0600 each), and the org's public trust bundle;
- ``client.db``: the `ClientStore` (session state, outbox, decrypted messages);
- ``client.lock``: held by the one process whose `Client` uses the profile (its pid inside).

The client machine never sees the server's files: everything here came from the device itself
or, at login, from the directory service.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from meshchat.e2ee import BoxKeyPair, KeyStore, OrgTrust, SigningKeyPair
from meshchat.errors import ConfigError, EnvelopeError, NotFoundError, TopicError
from meshchat.topics import validate_name

__all__ = [
    "LOCK_FILE",
    "PROFILES_DIR",
    "STORE_FILE",
    "DeviceProfile",
    "list_profiles",
    "open_profile",
]

PROFILES_DIR: Final = "profiles"
_PROFILE_FILE: Final = "profile.json"
_SIGNING: Final = "device.sign"
_BOX: Final = "device.box"
_TOKEN: Final = "device.token"  # noqa: S105  # a file name
_TRUST: Final = "trust.bin"
STORE_FILE: Final = "client.db"
LOCK_FILE: Final = "client.lock"


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """One user's device on this machine."""

    path: Path
    org: str
    user: str
    device: str
    broker: str
    fingerprint: str

    @property
    def keys(self) -> KeyStore:
        """The profile's key store."""
        return KeyStore(self.path / "keys")

    @property
    def store_path(self) -> Path:
        """The client store's file."""
        return self.path / STORE_FILE

    def signing(self) -> SigningKeyPair:
        """The device's Ed25519 key."""
        return SigningKeyPair(self._secret(_SIGNING))

    def box(self) -> BoxKeyPair:
        """The device's X25519 key."""
        return BoxKeyPair(self._secret(_BOX))

    def token(self) -> str:
        """The device's broker token."""
        return self._secret(_TOKEN).decode("utf-8")

    def trust(self) -> OrgTrust:
        """The org's trust bundle as it was verified at login.

        Raises:
            ConfigError: it is missing or damaged.
        """
        try:
            return OrgTrust.decode(self._secret(_TRUST))
        except (EnvelopeError, ValueError) as exc:
            raise ConfigError(f"the trust bundle of profile {self.path} is damaged: {exc}") from exc

    def _secret(self, name: str) -> bytes:
        value = self.keys.load(name)
        if value is None:
            raise ConfigError(
                f"profile {self.path} lacks {name}; run `meshchat login {self.user}` again"
            )
        return value

    @classmethod
    def create(
        cls,
        data: Path,
        *,
        org: str,
        user: str,
        device: str,
        broker: str,
        trust: OrgTrust,
        signing: SigningKeyPair,
        box: BoxKeyPair,
        token: str,
    ) -> DeviceProfile:
        """Write a new profile (replacing an older one of the same user).

        Raises:
            ConfigError: the directory cannot be written.
        """
        path = data / PROFILES_DIR / user
        profile = cls(path, org, user, device, broker, trust.fingerprint)
        keys = profile.keys  # creates path/keys private
        path.chmod(0o700)
        keys.save(_SIGNING, signing.seed)
        keys.save(_BOX, box.secret)
        keys.save(_TOKEN, token.encode("utf-8"))
        keys.save(_TRUST, trust.encode())
        record = asdict(profile)
        record.pop("path")
        tmp = path / f".{_PROFILE_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path / _PROFILE_FILE)
        return profile

    @classmethod
    def load(cls, path: Path) -> DeviceProfile:
        """Read the profile in `path`.

        Raises:
            ConfigError: it is missing or damaged.
        """
        try:
            record = json.loads((path / _PROFILE_FILE).read_text(encoding="utf-8"))
            profile = cls(
                path,
                str(record["org"]),
                str(record["user"]),
                str(record["device"]),
                str(record["broker"]),
                str(record["fingerprint"]),
            )
            for name in (profile.org, profile.user, profile.device):
                validate_name(name)
        except FileNotFoundError as exc:
            raise ConfigError(f"no device profile in {path}") from exc
        except (OSError, ValueError, KeyError, TypeError, TopicError) as exc:
            raise ConfigError(f"the device profile in {path} is damaged: {exc}") from exc
        return profile


def list_profiles(data: Path) -> list[DeviceProfile]:
    """Every profile under the data directory, by user name."""
    root = data / PROFILES_DIR
    if not root.is_dir():
        return []
    return [
        DeviceProfile.load(child)
        for child in sorted(root.iterdir())
        if (child / _PROFILE_FILE).is_file()
    ]


def open_profile(data: Path, user: str | None = None) -> DeviceProfile:
    """The profile of `user`, or the only profile when no user is named.

    Raises:
        NotFoundError: no such profile, or several and none named.
    """
    if user is not None:
        path = data / PROFILES_DIR / user
        if not (path / _PROFILE_FILE).is_file():
            raise NotFoundError(
                f"no device profile for {user} in {data}; run `meshchat login {user}` first"
            )
        return DeviceProfile.load(path)
    profiles = list_profiles(data)
    if not profiles:
        raise NotFoundError(f"no device profile in {data}; run `meshchat login USER` first")
    if len(profiles) > 1:
        names = ", ".join(p.user for p in profiles)
        raise NotFoundError(f"several profiles in {data} ({names}): choose one with --as USER")
    return profiles[0]
