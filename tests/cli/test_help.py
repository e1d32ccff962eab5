"""Every command has help text, and the README mentions every command."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer.core
import typer.main
from typer.testing import CliRunner

from cli import app
from tests.cli.running import MESHCHAT

README = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")


Command = typer.core.TyperGroup | typer.core.TyperCommand


def _find(path: tuple[str, ...]) -> Command:
    command = typer.main.get_command(app)
    for name in path:
        assert isinstance(command, typer.core.TyperGroup)
        command = command.commands[name]
    assert isinstance(command, typer.core.TyperGroup | typer.core.TyperCommand)
    return command


def _commands(path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    command = _find(path)
    if isinstance(command, typer.core.TyperGroup):
        for name in sorted(command.commands):
            yield from _commands((*path, name))


COMMANDS = list(_commands())


def test_there_are_commands() -> None:
    assert ("up",) in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "meshchat")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    command = _find(path)
    assert command.help, f"`meshchat {' '.join(path)}` has no help text"
    for param in command.params:
        if isinstance(param, typer.core.TyperOption) and not param.hidden:
            assert param.help, f"option {param.opts} of `meshchat {' '.join(path)}` has no help"


@pytest.mark.parametrize("path", [p for p in COMMANDS if p], ids=" ".join)
def test_every_command_is_in_the_readme(path: tuple[str, ...]) -> None:
    assert f"meshchat {' '.join(path)}" in README


def test_console_script_prints_help_and_version() -> None:
    result = subprocess.run(
        [MESHCHAT, "--help"], capture_output=True, text=True, check=True, timeout=30
    )
    assert "up" in result.stdout
    version = subprocess.run(
        [MESHCHAT, "--version"], capture_output=True, text=True, check=True, timeout=30
    )
    assert version.stdout.startswith("meshchat ")


def test_readme_first_screen_has_the_two_commands() -> None:
    first_screen = "\n".join(README.splitlines()[:40])
    assert "make run" in first_screen
    assert "make test" in first_screen
