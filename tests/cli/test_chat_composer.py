"""What the chat app's composer understands, and how a group's history is paged (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from cli.chatapp import Command, CommandError, parse
from cli.chatapp.model import PAGE, older
from meshchat.client import ClientStore
from meshchat.e2ee import Inner, Kind, encode_inner

TOPIC = "mc/acme/ops/line1"


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("forklift 3 is down", Command("say", "forklift 3 is down")),
        ("//shrug", Command("say", "/shrug")),
        ("/reply #4 on my way", Command("reply", "on my way", 4)),
        ("/reply 10 minutes away", Command("reply", "10 minutes away")),
        ("/edit meet at 11", Command("edit", "meet at 11")),
        ("/recall", Command("recall")),
        ("/recall 7", Command("recall", ref=7)),
        ("/ack #2", Command("ack", ref=2)),
        ("/urgent evacuate hall B", Command("urgent", "evacuate hall B")),
        ("/search forklift  battery since:2d", Command("search", "forklift battery", since=172800)),
        ("/search until:1h dock", Command("search", "dock", until=3600)),
        ("/JOIN ops/Line2", Command("join", "ops/line2")),
        ("/who", Command("who")),
        ("/leave", Command("leave")),
        ("/leave ops/Line2", Command("leave", "ops/line2")),
        ("/react 👍", Command("react", "👍")),
        ("/react #3 +1", Command("react", "+1", 3)),
        (
            "/dispatch Van-1 fix the dock door",
            Command("dispatch", "fix the dock door", device="van-1"),
        ),
        ("/help", Command("help")),
    ],
)
def test_lines_become_commands(line: str, command: Command) -> None:
    assert parse(line) == command


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("/shout hello", r"/shout is not a command; the commands are /reply"),
        ("/reply #4", r"usage: /reply \[#N\] TEXT"),
        ("/recall 4 please", r"usage: /recall \[#N\]"),
        ("/urgent", r"usage: /urgent TEXT"),
        ("/search since:2d", r"usage: /search WORDS"),
        ("/search dock since:2 days", r"since: duration '2' is not understood"),
        ("/join line2", r"usage: /join DEPT/GROUP"),
        ("/who is here", r"usage: /who"),
        ("/leave line2", r"usage: /leave \[DEPT/GROUP\]"),
        ("/react", r"usage: /react \[#N\] EMOJI"),
        ("/react thumbs up", r"usage: /react \[#N\] EMOJI"),
        ("/dispatch van-1", r"usage: /dispatch DEVICE TEXT"),
        ("/dispatch van_1 go north", r"usage: /dispatch DEVICE TEXT"),
    ],
)
def test_mistakes_get_their_usage(line: str, error: str) -> None:
    with pytest.raises(CommandError, match=error):
        parse(line)


def test_paging_back_skips_receipts_and_finds_every_message(tmp_path: Path) -> None:
    with ClientStore(tmp_path / "client.db") as store:
        for index in range(300):
            # Each message is followed by three receipts, all in the same few seconds.
            store.add_message(
                TOPIC,
                (1, index),
                sender="bob",
                device="bob-laptop",
                kind=int(Kind.TEXT),
                ts=1000 + index // 100,
                body=f"message {index}",
                fields=encode_inner(Inner(Kind.TEXT, 1000, (f"message {index}",))),
            )
            for receipt in range(3):
                store.add_message(
                    TOPIC,
                    (2 + receipt, index),
                    sender="carol",
                    device="carol-phone",
                    kind=int(Kind.RECEIPT),
                    ts=1000 + index // 100,
                    body="",
                    fields=b"",
                )
        seen: set[tuple[int, int]] = set()
        pages = []
        until = None
        while True:
            found, more = older(store, TOPIC, until_ts=until, seen=seen, want=120)
            pages.append(len(found))
            seen.update(m.message_id for m in found)
            if not more:
                break
            until = found[0].ts
        assert PAGE < 1200  # more rows than one read of the store holds
        assert pages == [120, 120, 60]
        assert seen == {(1, index) for index in range(300)}


def test_chat_without_a_profile_says_how_to_get_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["chat", "--data", str(tmp_path)])
    assert result.exit_code == 1
    assert "error:" in result.output
    assert "meshchat login" in result.output
