"""The data directory (``--data``, ``MESHCHAT_DATA``): where a site server keeps its files."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from meshchat.errors import BusyError, ConfigError

__all__ = ["DEFAULT_DATA_DIR", "ENV_VAR", "DataDir", "exclusive_lock"]

DEFAULT_DATA_DIR: Final = Path(".meshchat")
ENV_VAR: Final = "MESHCHAT_DATA"


class DataDir:
    """One data directory: created private (0700), checked writable, locked by its one user."""

    def __init__(self, path: Path | str) -> None:
        """Refer to `path`; nothing is touched until `ensure` or `lock`."""
        self.path = Path(path).expanduser().absolute()

    def __repr__(self) -> str:
        """Show the path."""
        return f"DataDir({str(self.path)!r})"

    def ensure(self) -> Path:
        """Create the directory if needed and prove it is writable.

        Raises:
            ConfigError: it exists and is not a directory, cannot be created, or is not writable.
        """
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"data directory {self.path} exists and is not a directory")
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as exc:
            raise ConfigError(
                f"data directory {self.path} is unusable: {exc.strerror or exc}"
            ) from exc
        return self.path

    @contextlib.contextmanager
    def lock(self, name: str = "up") -> Iterator[Path]:
        """Hold an exclusive lock so two servers never share one data directory.

        The lock is released when the process ends, even by ``kill -9``.

        Raises:
            ConfigError: another process holds the lock, or the lock file cannot be opened.
        """
        self.ensure()
        with exclusive_lock(self.path / f"{name}.lock", f"data directory {self.path}") as path:
            yield path


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, what: str) -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on `lock_path` (created 0600) for as long as needed.

    The holder's pid is written into the file so that a refusal can name it. The lock goes
    away with the process, even by ``kill -9``: nothing stale is ever left to clean up.

    Args:
        lock_path: the lock file.
        what: what the lock protects, for the error message ("data directory ...").

    Raises:
        BusyError: another process (or another open of the same file) holds the lock.
        ConfigError: the lock file cannot be opened.
    """
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open {lock_path}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            pid = int(holder) if holder.isdigit() else None
            raise BusyError(
                f"{what} is in use by another meshchat process (pid {holder or 'unknown'})",
                pid=pid,
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_path
    finally:
        os.close(fd)
