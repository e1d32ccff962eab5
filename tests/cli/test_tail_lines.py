"""What `meshchat tail` prints for each kind of message: a line a person can read, or nothing."""

from __future__ import annotations

import pytest

from cli import client as tail_cli
from meshchat.client import Message
from meshchat.e2ee import Kind


def printed(message: Message, capsys: pytest.CaptureFixture[str]) -> str:
    tail_cli._print_event(message)  # the formatter `tail` uses for each event
    return " ".join(capsys.readouterr().out.split())


def msg(kind: Kind, *fields: object, sender: str = "bob") -> Message:
    return Message("ops/line1", (7, 3), sender, f"{sender}-phone", kind, 1_700_000_000, fields)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (msg(Kind.TEXT, "pallet 7 is in bay 3"), "bob: pallet 7 is in bay 3"),
        (msg(Kind.REPLY, "on my way", (7, 1)), "bob (reply to 7:1): on my way"),
        (msg(Kind.EDIT, "pallet 8", (7, 1)), "bob edited 7:1: pallet 8"),
        (msg(Kind.RECALL, (7, 1)), "bob recalled 7:1"),
        (msg(Kind.REACT, "👍", (7, 1)), "bob reacted 👍 to 7:1"),
        (msg(Kind.ACK, (7, 1)), "bob acknowledged 7:1"),
        (msg(Kind.URGENT, "gas leak in bay 2"), "bob URGENT: gas leak in bay 2"),
    ],
    ids=lambda value: value.kind.name if isinstance(value, Message) else "",
)
def test_each_kind_prints_a_readable_line(
    message: Message, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert printed(message, capsys).endswith(expected)


def test_receipts_print_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert printed(msg(Kind.RECEIPT, 1, ((7, 1),), sender="alice"), capsys) == ""
