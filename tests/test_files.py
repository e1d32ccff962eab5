"""Private files: replaced whole, readable by their owner only, never written through a symlink."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from meshchat.files import write_private


def test_a_write_replaces_the_file_whole_and_makes_it_private(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.write_bytes(b"old" * 1000)
    target.chmod(0o644)
    write_private(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state"]  # no temporary file left


def test_a_large_write_arrives_complete(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40_000  # 10 MB: more than one write() may take
    write_private(tmp_path / "big", data)
    assert (tmp_path / "big").read_bytes() == data


def test_a_symlink_planted_at_the_temporary_name_is_refused(tmp_path: Path) -> None:
    target, elsewhere = tmp_path / "state", tmp_path / "elsewhere"
    target.write_bytes(b"old")
    elsewhere.write_bytes(b"untouched")
    (tmp_path / ".state.tmp").symlink_to(elsewhere)
    with pytest.raises(OSError, match="symbolic link"):
        write_private(target, b"new")
    assert target.read_bytes() == b"old"
    assert elsewhere.read_bytes() == b"untouched"
