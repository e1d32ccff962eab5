"""Private files written atomically and durably.

After a crash a file holds its old content or its new, never half of either, and a finished
write survives a power cut. The recipe: write a temporary file beside the target (mode 0600,
never through a symlink), fsync it, rename it over the target, then fsync the directory so the
rename itself is on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_directory", "write_private", "write_temporary"]


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (a rename, link or new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temporary(path: Path, data: bytes) -> Path:
    """Write `data` to a private temporary file beside `path`, flushed to disk; returns its path.

    Raises:
        OSError: it cannot be written (the temporary file is removed).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably, readable by this user only.

    Raises:
        OSError: it cannot be written: `path` then holds its old content, or (when only the
            final directory sync failed) the new content, not yet known to be on disk.
    """
    tmp = write_temporary(path, data)
    try:
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
