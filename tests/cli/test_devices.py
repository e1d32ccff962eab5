"""`meshchat device` as an admin types it, and the README's device example run as written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshchat.device import DeviceCredentials
from tests.cli.running import CLI_ENV as ENV
from tests.cli.running import MESHCHAT, LineReader, UpProcess, read_line_matching
from tests.cli.running import run_meshchat as meshchat

README = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")


def readme_device_example() -> str:
    """The Python block after the README's device-example marker, exactly as written there."""
    after = README.split("<!-- device-example -->", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def run_example(where: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", readme_device_example()],
        cwd=where,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=False,
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "data"
    up = UpProcess(["--port", "0", "--data", str(data)])
    try:
        up.wait_ready()
        done = meshchat(
            data, "user", "add", "alice", "--dept", "ops", "--password-stdin", stdin="alice pass\n"
        )
        assert done.returncode == 0, done.stderr
        yield data
    finally:
        up.stop()


def list_json(data: Path) -> dict[str, dict[str, object]]:
    done = meshchat(data, "device", "list", "--as", "alice", "--wait", "5", "--json")
    assert done.returncode == 0, done.stderr
    return {row["device"]: row for row in json.loads(done.stdout)}


def work_order_beside_a_running_tail(server: Path, device_dir: Path) -> None:
    """Beside a running `tail` on alice's profile, then with the device running.

    `device list` shows what her device last read; `dispatch send` hands the order to the tail,
    and `dispatch list` reads its ledger. The device is off: its next run takes the order and
    accepts it.
    """
    tail = subprocess.Popen(
        [MESHCHAT, "tail", "--as", "alice", "ops/dispatch", "--json", "--data", str(server)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    assert tail.stdout is not None
    reader = LineReader(tail.stdout)
    try:
        read_line_matching(reader, '"event": "link"', timeout=30)
        beside = meshchat(server, "device", "list", "--as", "alice")
        assert beside.returncode == 0, beside.stderr
        assert "on route" in beside.stdout
        assert "presence unknown" in beside.stderr
        assert f"pid {tail.pid}" in beside.stderr
        sent = meshchat(
            server,
            "dispatch",
            "send",
            "van-1",
            "pick up 12 pallets at gate 4",
            "--as",
            "alice",
            "--json",
        )
        assert sent.returncode == 0, sent.stderr
        handed = json.loads(sent.stdout)
        assert handed["queued"] is False  # the tail's client published it
        order_id = handed["id"]
        listed = meshchat(server, "dispatch", "list", "--as", "alice", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [(o["id"], o["state"]) for o in json.loads(listed.stdout)] == [(order_id, "sent")]
    finally:
        tail.terminate()
        tail.wait(timeout=20)
        reader.rest()  # the reading thread ends with the process and closes the pipe
    ran = run_example(device_dir)
    assert ran.returncode == 0, ran.stderr
    assert "work order: pick up 12 pallets at gate 4" in ran.stdout
    listed = meshchat(server, "dispatch", "list", "--as", "alice", "--json")
    assert listed.returncode == 0, listed.stderr
    (order,) = json.loads(listed.stdout)
    assert (order["id"], order["device"], order["state"]) == (order_id, "van-1", "accepted")
    assert order["accepted_at"] is not None
    open_table = meshchat(server, "dispatch", "list", "--open", "--as", "alice")
    assert order_id in open_table.stdout
    assert "accepted" in open_table.stdout


def test_add_run_the_readme_example_list_and_remove(server: Path, tmp_path: Path) -> None:
    added = meshchat(server, "device", "add", "van-1", "--dept", "ops", "--json")
    assert added.returncode == 0, added.stderr
    made = json.loads(added.stdout)
    assert (made["group"], made["created_group"], made["kind"]) == ("ops/dispatch", True, "tracker")
    credentials = Path(made["credentials"])
    assert credentials == server / "devices" / "van-1.json"
    assert credentials.stat().st_mode & 0o777 == 0o600
    loaded = DeviceCredentials.load(credentials)
    assert loaded.broker == made["broker"]
    assert loaded.broker.startswith("mqtt://127.0.0.1:")
    assert meshchat(server, "group", "add", "ops/dispatch", "alice").returncode == 0
    login = meshchat(server, "login", "alice", "--password-stdin", stdin="alice pass\n")
    assert login.returncode == 0, login.stderr
    before = list_json(server)["van-1"]  # alice's device is known to the broker from now on
    assert before["presence"] == "never seen"
    assert before["status"] is None
    never = meshchat(server, "device", "list", "--as", "alice")
    assert "encrypted" not in never.stdout  # nothing came from it yet: nothing to explain

    device_dir = tmp_path / "van"
    device_dir.mkdir()
    shutil.copy(credentials, device_dir / "van-1.json")  # copy keeps 0600
    ran = run_example(device_dir)
    assert ran.returncode == 0, ran.stderr

    row = list_json(server)["van-1"]
    assert row["presence"] == "offline"  # the example closed cleanly
    assert row["readable"] is True
    status = row["status"]
    assert isinstance(status, dict)
    assert (status["battery"], status["temperature"], status["state"]) == (87, 21.5, "on route")
    assert row["groups"] == ["ops/dispatch"]

    table = meshchat(server, "device", "list", "--as", "alice")
    assert table.returncode == 0, table.stderr
    assert "van-1" in table.stdout
    assert "on route" in table.stdout

    work_order_beside_a_running_tail(server, device_dir)

    removed = meshchat(server, "device", "remove", "van-1")
    assert removed.returncode == 0, removed.stderr
    assert "Revoked van-1" in removed.stdout
    refused = run_example(device_dir)
    assert refused.returncode != 0
    assert "refused device van-1" in refused.stderr
    again = meshchat(server, "device", "add", "van-1", "--dept", "ops", "--out", "x.json")
    assert again.returncode == 1
    assert "revoked account" in again.stderr


def test_bad_input_gets_one_clear_error(server: Path) -> None:
    kind = meshchat(server, "device", "add", "van-2", "--dept", "ops", "--kind", "toaster")
    assert kind.returncode == 2
    assert "toaster" in kind.stderr
    name = meshchat(server, "device", "add", "Van_2", "--dept", "ops")
    assert name.returncode == 1
    assert "device name" in name.stderr
    person = meshchat(server, "device", "remove", "alice")
    assert person.returncode == 1
    assert "is a person's account" in person.stderr
    out = server / "taken.json"
    out.write_text("{}", encoding="utf-8")
    taken = meshchat(server, "device", "add", "van-3", "--dept", "ops", "--out", str(out))
    assert taken.returncode == 1
    assert "never overwritten" in taken.stderr
    assert "van-3" not in meshchat(server, "device", "list", "--json").stdout


def test_simulated_devices_report_and_take_work_orders(server: Path) -> None:
    # alice is in ops: the broker lets a device's own department read its telemetry.
    first = meshchat(
        server,
        "device",
        "simulate",
        "--count",
        "2",
        "--dept",
        "ops",
        "--interval",
        "0.5",
        "--duration",
        "1s",
        "--json",
    )
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["devices"] == ["sim-1", "sim-2"]
    assert (server / "devices" / "sim-1.json").stat().st_mode & 0o777 == 0o600
    assert meshchat(server, "group", "add", "ops/dispatch", "alice").returncode == 0
    login = meshchat(server, "login", "alice", "--password-stdin", stdin="alice pass\n")
    assert login.returncode == 0, login.stderr
    assert set(list_json(server)) == {"sim-1", "sim-2"}  # alice's device now has a session
    sent = meshchat(
        server, "dispatch", "send", "sim-1", "inspect dock 3", "--as", "alice", "--json"
    )
    assert sent.returncode == 0, sent.stderr
    order_id = json.loads(sent.stdout)["id"]

    again = meshchat(
        server,
        "device",
        "simulate",
        "--count",
        "2",
        "--dept",
        "ops",
        "--interval",
        "0.5",
        "--duration",
        "4s",
        "--work",
        "0",
        "--json",
    )
    assert again.returncode == 0, again.stderr
    ran = json.loads(again.stdout)
    assert (ran["orders_accepted"], ran["orders_done"]) == (1, 1)
    assert ran["fixes"] >= 2
    assert ran["statuses"] == 2

    rows = list_json(server)
    for name in ("sim-1", "sim-2"):
        status = rows[name]["status"]
        assert isinstance(status, dict)
        assert status["state"] in {"moving", "parked"}
    listed = meshchat(server, "dispatch", "list", "--as", "alice", "--json")
    (order,) = json.loads(listed.stdout)
    assert (order["id"], order["state"], order["device"]) == (order_id, "done", "sim-1")
