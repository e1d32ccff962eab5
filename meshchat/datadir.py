"""The data directory (``--data``, ``MESHCHAT_DATA``): where a site server keeps its files."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from meshchat.errors import ConfigError

__all__ = ["DEFAULT_DATA_DIR", "ENV_VAR", "DataDir"]

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
        lock_path = self.path / f"{name}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open {lock_path}: {exc.strerror or exc}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                raise ConfigError(
                    f"data directory {self.path} is in use by another meshchat process "
                    f"(pid {holder})"
                ) from exc
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield lock_path
        finally:
            os.close(fd)
