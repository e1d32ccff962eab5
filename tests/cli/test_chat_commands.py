"""login, send, tail and history as a user types them, against a running `meshchat up`."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.running import CLI_ENV as ENV
from tests.cli.running import MESHCHAT, LineReader, UpProcess, read_line_matching
from tests.cli.running import run_meshchat as meshchat


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "data"
    up = UpProcess(["--port", "0", "--data", str(data)])
    try:
        up.wait_ready()
        for user in ("alice", "bob"):
            done = meshchat(
                data,
                "user",
                "add",
                user,
                "--dept",
                "ops",
                "--password-stdin",
                stdin=f"{user} passphrase\n",
            )
            assert done.returncode == 0, done.stderr
        assert meshchat(data, "group", "create", "ops/general").returncode == 0
        assert meshchat(data, "group", "add", "ops/general", "alice", "bob").returncode == 0
        yield data
    finally:
        up.stop()


def test_login_send_tail_and_history(server: Path) -> None:
    for user in ("alice", "bob"):
        done = meshchat(server, "login", user, "--password-stdin", stdin=f"{user} passphrase\n")
        assert done.returncode == 0, done.stderr
        assert f"Logged in as {user}" in done.stdout
        assert "fingerprint" in done.stdout
    profile = server / "profiles" / "alice" / "keys"
    assert oct(profile.stat().st_mode & 0o777) == "0o700"
    tail = subprocess.Popen(
        [MESHCHAT, "tail", "--as", "alice", "ops/general", "--json", "--data", str(server)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert tail.stdout is not None
    reader = LineReader(tail.stdout)
    try:
        read_line_matching(reader, '"event": "link"', timeout=30)
        sent = meshchat(server, "send", "--as", "bob", "ops/general", "pallet 7 is in bay 3")
        assert sent.returncode == 0, sent.stderr
        line, _ = read_line_matching(reader, "pallet 7", timeout=30)
        event = json.loads(line)
        assert (event["event"], event["sender"], event["text"]) == (
            "message",
            "bob",
            "pallet 7 is in bay 3",
        )
    finally:
        tail.terminate()
        tail.wait(timeout=20)
        reader.rest()
        assert tail.stderr is not None
        tail.stderr.close()
    found = meshchat(
        server, "history", "--as", "alice", "ops/general", "--search", "pallet", "--json"
    )
    assert found.returncode == 0, found.stderr
    assert [m["text"] for m in json.loads(found.stdout)] == ["pallet 7 is in bay 3"]


def test_client_errors_are_one_line(server: Path) -> None:
    wrong = meshchat(server, "login", "alice", "--password-stdin", stdin="wrong\n")
    assert wrong.returncode == 1
    assert "error:" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    missing = meshchat(server, "send", "--as", "carol", "ops/general", "hi")
    assert missing.returncode == 1
    assert "meshchat login carol" in missing.stderr
    assert (
        meshchat(server, "login", "bob", "--password-stdin", stdin="bob passphrase\n").returncode
        == 0
    )
    not_member = meshchat(server, "send", "--as", "bob", "ops/other", "hi")
    assert not_member.returncode == 1
    assert "not in ops/other" in not_member.stderr
    bad_since = meshchat(server, "history", "--as", "bob", "ops/general", "--since", "soon")
    assert bad_since.returncode == 2
    assert "--since" in bad_since.stderr


def test_urgent_notice_ack_and_acks(server: Path) -> None:
    for user in ("alice", "bob"):
        done = meshchat(server, "login", user, "--password-stdin", stdin=f"{user} passphrase\n")
        assert done.returncode == 0, done.stderr
    sent = meshchat(server, "send", "--as", "bob", "ops/general", "--urgent", "gas leak in bay 2")
    assert sent.returncode == 0, sent.stderr
    mine = json.loads(meshchat(server, "history", "--as", "bob", "ops/general", "--json").stdout)
    assert [(m["kind"], m["text"]) for m in mine] == [("urgent", "gas leak in bay 2")]
    notice = mine[0]["id"]
    before = meshchat(server, "acks", "--as", "bob", "ops/general", notice, "--json")
    assert before.returncode == 0, before.stderr
    # The admin who created the group is a member too.
    assert json.loads(before.stdout)["unacknowledged"] == ["admin", "alice"]
    acked = meshchat(server, "ack", "--as", "alice", "ops/general", notice)
    assert acked.returncode == 0, acked.stderr
    after = meshchat(server, "acks", "--as", "bob", "ops/general", notice, "--json")
    assert json.loads(after.stdout)["unacknowledged"] == ["admin"]
    bad = meshchat(server, "ack", "--as", "alice", "ops/general", "not-an-id")
    assert bad.returncode == 2
    assert "CHAIN:INDEX" in bad.stderr


def _tail(server: Path, user: str) -> tuple[subprocess.Popen[str], LineReader]:
    tail = subprocess.Popen(
        [MESHCHAT, "tail", "--as", user, "ops/general", "--json", "--data", str(server)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    assert tail.stdout is not None
    reader = LineReader(tail.stdout)
    read_line_matching(reader, '"event": "link"', timeout=30)
    return tail, reader


def test_send_hands_its_message_to_the_client_running_on_the_same_profile(server: Path) -> None:
    for user in ("alice", "bob"):
        done = meshchat(server, "login", user, "--password-stdin", stdin=f"{user} passphrase\n")
        assert done.returncode == 0, done.stderr
    alice, alice_reads = _tail(server, "alice")
    bob, bob_reads = _tail(server, "bob")
    try:
        sent = meshchat(server, "send", "--as", "bob", "ops/general", "forklift 2 is free")
        assert sent.returncode == 0, sent.stderr
        assert "Sent to ops/general" in sent.stdout
        line, _ = read_line_matching(alice_reads, "forklift 2", timeout=30)
        assert json.loads(line)["sender"] == "bob"
        # Bob's tail kept its session: it still reads what alice sends.
        assert meshchat(server, "send", "--as", "alice", "ops/general", "thanks").returncode == 0
        line, _ = read_line_matching(bob_reads, "thanks", timeout=30)
        assert json.loads(line)["sender"] == "alice"
        # A second live client on the profile is refused with one line naming the holder.
        second = meshchat(server, "tail", "--as", "bob", "ops/general")
        assert second.returncode == 1
        assert f"in use by another meshchat process (pid {bob.pid})" in second.stderr
        assert "stop it first, or work through it" in second.stderr
        assert "Traceback" not in second.stderr
        # history --fetch says it cannot fetch and shows the local copy.
        local = meshchat(server, "history", "--as", "bob", "ops/general", "--fetch", "--json")
        assert local.returncode == 0, local.stderr
        assert "not fetched" in local.stderr
        assert "thanks" in [m["text"] for m in json.loads(local.stdout)]
    finally:
        for tail, reader in ((alice, alice_reads), (bob, bob_reads)):
            tail.terminate()
            tail.wait(timeout=20)
            reader.rest()
    # Bob's own message was sent exactly once, by his tail's client.
    mine = meshchat(server, "history", "--as", "alice", "ops/general", "--json")
    assert [(m["kind"], m["text"]) for m in json.loads(mine.stdout)] == [
        ("text", "forklift 2 is free"),
        ("text", "thanks"),
    ]
