"""What the chat app's composer understands: plain text, and slash commands (no IO here)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from meshchat.errors import MeshchatError
from meshchat.timeutil import parse_duration

__all__ = ["COMMANDS", "Command", "CommandError", "parse"]


class CommandError(ValueError):
    """A composer line that is not a command the app knows, or a command used wrongly."""


COMMANDS: Final[dict[str, tuple[str, str]]] = {
    "reply": ("/reply [#N] TEXT", "reply to #N (default: the latest from others)"),
    "edit": ("/edit [#N] TEXT", "change your message #N (default: your latest)"),
    "recall": ("/recall [#N]", "withdraw your message #N (default: your latest)"),
    "search": ("/search WORDS [since:2d]", "search all groups here; also until:12h"),
    "urgent": ("/urgent TEXT", "an urgent notice that members acknowledge"),
    "ack": ("/ack [#N]", "acknowledge urgent notice #N (or the latest)"),
    "react": ("/react [#N] EMOJI", "react to #N (default: the picked message, or the latest)"),
    "who": ("/who", "this group's members: online, offline, last seen"),
    "join": ("/join DEPT/GROUP", "open a group of yours, or join one (managers, admins)"),
    "leave": ("/leave [DEPT/GROUP]", "leave this group (or the one named)"),
    "dispatch": ("/dispatch DEVICE TEXT", "send a work order; its answers show here"),
    "help": ("/help", "keys and commands"),
}
"""Each command's usage and what it does, in the order the help screen lists them."""

_REF: Final = re.compile(r"#(\d{1,9})")
_BARE_REF: Final = re.compile(r"#?(\d{1,9})")
_RANGE: Final = re.compile(r"(since|until):(\S+)")
_DEVICE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
MAX_EMOJI: Final = 16
"""Characters a reaction may have (an emoji, or a short word like +1)."""


@dataclass(frozen=True, slots=True)
class Command:
    """One composer line, understood.

    Attributes:
        name: ``say`` for plain text, else the command's name (``reply``, ``edit``, ...).
        text: the text to send, the words to search for, the group to join or leave, the
            emoji to react with, or a work order's text.
        device: for a work order, the device it goes to.
        ref: the message number (``#N``) the command names, if it names one.
        since: for a search, only messages newer than this many seconds.
        until: for a search, only messages older than this many seconds.
    """

    name: str
    text: str = ""
    ref: int | None = None
    since: int | None = None
    until: int | None = None
    device: str = ""


def parse(line: str) -> Command:
    """Understand one composer line.

    Plain text is a message; ``//text`` sends ``/text`` as it is.

    Raises:
        CommandError: an unknown command, or one used without what it needs (the message
            gives its usage).
    """
    line = line.strip()
    if not line.startswith("/") or line.startswith("//"):
        return Command("say", line[1:] if line.startswith("//") else line)
    name, _, rest = line[1:].partition(" ")
    name, rest = name.lower(), rest.strip()
    if name not in COMMANDS:
        known = ", ".join(f"/{n}" for n in COMMANDS)
        raise CommandError(f"/{name} is not a command; the commands are {known} (// sends a /)")
    command = _PARSERS.get(name, _bare)(name, rest)
    if command is None:
        raise CommandError(f"usage: {COMMANDS[name][0]}")
    return command


def _with_text(name: str, rest: str) -> Command | None:
    ref, text = _leading_ref(rest, _REF)
    return Command(name, text, ref) if text else None


def _with_ref(name: str, rest: str) -> Command | None:
    ref, extra = _leading_ref(rest, _BARE_REF)
    return None if extra else Command(name, ref=ref)


def _urgent(name: str, rest: str) -> Command | None:
    return Command(name, rest) if rest else None


def _join(name: str, rest: str) -> Command | None:
    return Command(name, rest.lower()) if rest.count("/") == 1 and " " not in rest else None


def _leave(name: str, rest: str) -> Command | None:
    return Command(name) if not rest else _join(name, rest)


def _react(name: str, rest: str) -> Command | None:
    ref, emoji = _leading_ref(rest, _REF)
    if not emoji or " " in emoji or len(emoji) > MAX_EMOJI:
        return None
    return Command(name, emoji, ref)


def _dispatch(name: str, rest: str) -> Command | None:
    device, _, text = rest.partition(" ")
    device, text = device.lower(), text.strip()
    if not text or not _DEVICE.fullmatch(device):
        return None
    return Command(name, text, device=device)


def _bare(name: str, rest: str) -> Command | None:
    return None if rest else Command(name)


def _leading_ref(text: str, pattern: re.Pattern[str]) -> tuple[int | None, str]:
    first, _, rest = text.partition(" ")
    match = pattern.fullmatch(first)
    if match is None:
        return None, text
    return int(match[1]), rest.strip()


def _search(name: str, rest: str) -> Command | None:
    bounds: dict[str, int] = {}
    for match in _RANGE.finditer(rest):
        try:
            bounds[match[1]] = parse_duration(match[2])
        except MeshchatError as exc:
            raise CommandError(f"{match[1]}: {exc}") from exc
    words = " ".join(_RANGE.sub("", rest).split())
    if not re.search(r"\w", words):
        return None
    return Command(name, words, None, bounds.get("since"), bounds.get("until"))


_PARSERS: Final[dict[str, Callable[[str, str], Command | None]]] = {
    "reply": _with_text,
    "edit": _with_text,
    "recall": _with_ref,
    "ack": _with_ref,
    "urgent": _urgent,
    "search": _search,
    "join": _join,
    "leave": _leave,
    "react": _react,
    "dispatch": _dispatch,
}
"""How each command reads what follows its name (None: not its usage); the rest take nothing."""
