"""`meshchat up` as a user runs it: it prints where it listens, serves clients, stops cleanly."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from meshchat.directory import Directory
from tests.brokers import MOSQUITTO_MISSING
from tests.cli.running import MESHCHAT, LineReader, UpProcess, read_line_matching
from tests.mqtt import unique_topic


@pytest.fixture
def running_up(tmp_path: Path) -> Iterator[tuple[UpProcess, dict[str, str], Path]]:
    data = tmp_path / "data"
    up = UpProcess(["--port", "0", "--ws-port", "0", "--data", str(data)])
    try:
        urls = up.wait_ready()
        yield up, urls, data
    finally:
        up.kill()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_first_run_creates_the_org_and_prints_the_admin_password_once(
    running_up: tuple[UpProcess, dict[str, str], Path],
) -> None:
    up, urls, data = running_up
    assert set(urls) == {"mqtt", "ws"}
    assert any(str(data) in line for line in up.stdout_lines)
    assert not any("warning" in line for line in up.stdout_lines)
    runtime = json.loads((data / "up.json").read_text())
    assert runtime["listeners"] == [urls["mqtt"], urls["ws"]]
    assert runtime["pid"] == up.process.pid
    password = _admin_password(up.stdout_lines)
    with Directory(data / "directory.db") as directory:
        assert directory.org == "demo"
        assert directory.authenticate_password("admin", password).role.value == "admin"
    assert up.stop()[0] == 0
    again = UpProcess(["--port", "0", "--data", str(data)])
    try:
        again.wait_ready()
        assert not any("password" in line for line in again.stdout_lines)
    finally:
        again.kill()


def _admin_password(lines: list[str]) -> str:
    found = [line.split("password:", 1)[1].strip() for line in lines if "password:" in line]
    assert len(found) == 1, lines
    return found[0]


def _mosquitto_clients() -> tuple[str, str]:
    sub_bin, pub_bin = shutil.which("mosquitto_sub"), shutil.which("mosquitto_pub")
    if sub_bin is None or pub_bin is None:
        pytest.skip(MOSQUITTO_MISSING)
    return sub_bin, pub_bin


def _exchange(port: int, topic: str, sub_auth: list[str], pub_auth: list[str]) -> str:
    """mosquitto_sub waits for one message that mosquitto_pub sends; returns what it printed."""
    sub_bin, pub_bin = _mosquitto_clients()
    common = ["-h", "127.0.0.1", "-p", str(port), "-t", topic, "-q", "1"]
    # stdbuf: mosquitto_sub's stdio is block-buffered on a pipe; we need its SUBACK line at once.
    subscriber = subprocess.Popen(
        ["stdbuf", "-oL", sub_bin, "-d", *common, *sub_auth, "-C", "1", "-W", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert subscriber.stdout is not None
    output = LineReader(subscriber.stdout)
    try:
        read_line_matching(output, "SUBACK")
        subprocess.run([pub_bin, *common, *pub_auth, "-m", "shift starts"], check=True, timeout=20)
        received, _ = read_line_matching(output, "shift starts")
        assert subscriber.wait(timeout=20) == 0
        return received.strip()
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
        subscriber.wait()
        output.rest()


async def _granted(port: int, user: str, password: str, topic: str) -> bool:
    async with aiomqtt.Client(
        "127.0.0.1", port, username=user, password=password, identifier=f"{user}.probe", timeout=10
    ) as client:
        return list(await client.subscribe(topic, qos=1)) == [1]


def _wait_until_subscribable(port: int, user: str, password: str, topic: str) -> None:
    """Each try is a real login and SUBSCRIBE, so the loop is paced by the server's answers."""
    deadline = time.monotonic() + 10
    while not asyncio.run(_granted(port, user, password, topic)):
        if time.monotonic() > deadline:
            msg = f"{user} still may not subscribe to {topic} after 10 s"
            raise TimeoutError(msg)


def _meshchat(data: Path, *args: str, stdin: str | None = None) -> None:
    subprocess.run(
        [MESHCHAT, *args, "--data", str(data)], input=stdin, text=True, check=True, timeout=60
    )


def test_mosquitto_clients_exchange_a_message_as_directory_users(
    running_up: tuple[UpProcess, dict[str, str], Path],
) -> None:
    _mosquitto_clients()
    _, urls, data = running_up
    # The README's next steps, run while the server is up.
    _meshchat(
        data, "user", "add", "alice", "--dept", "ops", "--password-stdin", stdin="alice pass\n"
    )
    _meshchat(data, "group", "create", "ops/general")
    _meshchat(data, "group", "add", "ops/general", "alice")
    # The server notices the change within a fraction of a second: wait until it has.
    _wait_until_subscribable(_port(urls["mqtt"]), "alice", "alice pass", "mc/demo/ops/general")
    alice = ["-u", "alice", "-P", "alice pass"]
    received = _exchange(
        _port(urls["mqtt"]),
        "mc/demo/ops/general",
        [*alice, "-i", "alice.sub"],
        [*alice, "-i", "alice.pub"],
    )
    assert received == "shift starts"


def test_anonymous_mode_warns_and_lets_loopback_clients_in(tmp_path: Path) -> None:
    _mosquitto_clients()
    up = UpProcess(["--port", "0", "--anonymous", "--data", str(tmp_path / "data")])
    try:
        urls = up.wait_ready()
        assert any("warning: --anonymous" in line for line in up.stdout_lines)
        assert not (tmp_path / "data" / "directory.db").exists()
        assert _exchange(_port(urls["mqtt"]), unique_topic("any"), [], []) == "shift starts"
    finally:
        up.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_up_stops_cleanly_on_signal(
    running_up: tuple[UpProcess, dict[str, str], Path], signum: int
) -> None:
    up, urls, data = running_up
    code, out, err = up.stop(signum)
    assert code == 0
    assert "Traceback" not in err
    assert err == ""
    assert out.strip().splitlines()[-1] == "stopped."
    assert not (data / "up.json").exists()
    with socket.socket() as probe:  # the port is free again
        probe.bind(("127.0.0.1", _port(urls["mqtt"])))


def test_taken_port_exits_with_one_clear_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = int(taken.getsockname()[1])
        up = UpProcess(["--port", str(port), "--data", str(tmp_path / "data")])
        code, out, err = up.finish()
    assert code == 1
    assert err.strip() == (
        f"error: cannot listen for mqtt on 127.0.0.1:{port}: the address is already in use"
    )
    assert "Traceback" not in out


def test_unusable_data_directory_exits_with_one_clear_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    code, _, err = UpProcess(["--port", "0", "--data", str(not_a_dir)]).finish()
    assert code == 1
    assert err.strip() == f"error: data directory {not_a_dir} exists and is not a directory"


def test_second_up_on_the_same_data_directory_is_refused(
    running_up: tuple[UpProcess, dict[str, str], Path],
) -> None:
    first, _, data = running_up
    code, _, err = UpProcess(["--port", "0", "--data", str(data)]).finish()
    assert code == 1
    assert err.strip() == (
        f"error: data directory {data} is in use by another meshchat process "
        f"(pid {first.process.pid})"
    )


def test_tls_needs_both_files(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    code, _, err = UpProcess(["--tls-cert", str(cert), "--data", str(tmp_path)]).finish()
    assert code == 2
    assert "--tls-cert and --tls-key go together" in err
