"""Validation of the names that make up meshchat topics (org, department, group, user, ...)."""

from __future__ import annotations

import unicodedata
from typing import Final

from meshchat.errors import TopicError

__all__ = [
    "MAX_NAME_LEN",
    "NAME_CHARS",
    "RESERVED_DEPARTMENTS",
    "validate_name",
]

MAX_NAME_LEN: Final = 32
NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
RESERVED_DEPARTMENTS: Final = frozenset({"sites"})
"""Names no real department may take: ``sites`` is the pseudo-department of site channels."""

_RULE: Final = "names are 1 to 32 characters of a-z, 0-9 and '-'"


def _describe(char: str) -> str:
    """Say what a bad character is, in words a user recognises."""
    special = {
        "+": "the MQTT wildcard '+'",
        "#": "the MQTT wildcard '#'",
        "/": "the topic separator '/'",
        "\x00": "a NUL character",
        "_": "'_'",
        " ": "a space",
        "$": "'$'",
    }
    if char in special:
        return special[char]
    if char.isascii() and char.isupper():
        return f"the upper-case letter {char!r}"
    if not char.isascii():
        name = unicodedata.name(char, f"U+{ord(char):04X}")
        return f"the non-ASCII character {char!r} ({name})"
    if not char.isprintable():
        return f"the control character U+{ord(char):04X}"
    return f"the character {char!r}"


def validate_name(value: object, what: str = "name") -> str:
    """Check one topic level that must be a meshchat name, and return it.

    Args:
        value: the name to check.
        what: what the name is ("group name", "user name", ...): it starts the error message.

    Returns:
        The name, unchanged.

    Raises:
        TopicError: the name is empty, too long, not a string, starts with ``_`` (a system
            namespace) or holds a character outside ``[a-z0-9-]``. The message names the part
            and the first offending character.
    """
    if not isinstance(value, str):
        raise TopicError(
            f"{what} must be a string, not {type(value).__name__}", part=what, value=repr(value)
        )
    if not value:
        raise TopicError(f"{what} is empty; {_RULE}", part=what, value=value)
    if len(value) > MAX_NAME_LEN:
        raise TopicError(
            f"{what} {value[:40]!r}{'...' if len(value) > 40 else ''} is {len(value)} characters "
            f"long; {_RULE}",
            part=what,
            value=value,
        )
    if value.startswith("_"):
        raise TopicError(
            f"{what} {value!r} starts with '_', which marks a system namespace; {_RULE}",
            part=what,
            value=value,
        )
    for position, char in enumerate(value):
        if char not in NAME_CHARS:
            raise TopicError(
                f"{what} {value!r} holds {_describe(char)} at position {position}; {_RULE}",
                part=what,
                value=value,
            )
    return value
