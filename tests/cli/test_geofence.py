"""The geofence commands as an admin runs them: sites' timing, OwnTracks keys, the worker."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cli import app
from meshchat.client import Transport
from meshchat.directory import Directory
from meshchat.envelope import Signed, decode
from meshchat.geofence import offset
from tests.brokers import embedded_broker
from tests.cli.running import MESHCHAT, LineReader, read_line_matching

PLANT = (48.137, 11.575)


class Meshchat:
    """Runs `meshchat ...` in-process against one data directory."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.runner = CliRunner()

    def __call__(self, *args: str, stdin: str | None = None, code: int = 0) -> str:
        return self.run(*args, stdin=stdin, code=code).output

    def run(self, *args: str, stdin: str | None = None, code: int = 0) -> Result:
        result = self.runner.invoke(app, [*args, "--data", str(self.data)], input=stdin)
        assert result.exit_code == code, result.output
        return result

    def json(self, *args: str, stdin: str | None = None) -> object:
        return json.loads(self.run(*args, "--json", stdin=stdin).stdout)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("cli") / "data"
    run = Meshchat(data)
    run(
        "org", "init", "--org", "acme", "--admin", "root", "--password-stdin", stdin="s3cret-pass\n"
    )
    run("user", "add", "carol", "--dept", "ops")
    return data


@pytest.fixture
def meshchat(template: Path, tmp_path: Path) -> Meshchat:
    shutil.copytree(template, tmp_path / "data")
    return Meshchat(tmp_path / "data")


def test_a_sites_dwell_and_hysteresis_are_set_listed_and_audited(meshchat: Meshchat) -> None:
    lat, lon = (str(v) for v in PLANT)
    meshchat(
        "site", "add", "plant-3", "--lat", lat, "--lon", lon, "--radius", "150", "--dwell", "45s"
    )
    meshchat("site", "set", "plant-3", "--exit-dwell", "3m", "--hysteresis", "20")
    sites = meshchat.json("site", "list")
    assert isinstance(sites, list)
    assert [(s["dwell_s"], s["exit_dwell_s"], s["hysteresis_m"]) for s in sites] == [(45, 180, 20)]
    changed = meshchat.json("site", "set", "plant-3", "--default-timing", "--dwell", "0")
    assert isinstance(changed, dict)
    assert (changed["dwell_s"], changed["exit_dwell_s"], changed["hysteresis_m"]) == (0, 120, 10)
    entries = meshchat.json("audit", "show")
    assert isinstance(entries, list)
    actions = [e["action"] for e in entries]
    assert actions[-3:] == ["group.create", "site.set", "site.set"]
    assert "--dwell: duration" in meshchat("site", "set", "plant-3", "--dwell", "soon", code=2)


def test_a_crossing_polygon_is_refused_before_anything_is_written(
    meshchat: Meshchat, tmp_path: Path
) -> None:
    bowtie = tmp_path / "bowtie.geojson"
    ring = [[11.0, 48.0], [11.2, 48.1], [11.0, 48.1], [11.1, 48.0], [11.0, 48.0]]
    bowtie.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    assert "cross" in meshchat("site", "add", "yard", "--polygon", str(bowtie), code=1)
    assert meshchat.json("site", "list") == []


def test_owntracks_keys_are_kept_secret_and_can_be_removed(meshchat: Meshchat) -> None:
    output = meshchat("site", "owntracks-key", "carol", "phone", stdin="mysecreTpass01\n")
    assert "Registered the OwnTracks key of carol/phone" in output
    (key_file,) = (meshchat.data / "keys" / "owntracks").iterdir()
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_bytes() == b"mysecreTpass01".ljust(32, b"\0")
    status = meshchat.json("geofence", "status")
    assert isinstance(status, dict)
    assert status["owntracks_keys"] == ["carol/phone"]
    audit = json.dumps(meshchat.json("audit", "show"))
    assert "owntracks.key" in audit
    assert "mysecreTpass01" not in audit
    meshchat("site", "owntracks-key", "carol", "phone", "--remove")
    assert not key_file.exists()
    assert "no OwnTracks key" in meshchat(
        "site", "owntracks-key", "carol", "phone", "--remove", code=1
    )
    assert "no user 'nobody'" in meshchat(
        "site", "owntracks-key", "nobody", "phone", stdin="x\n", code=1
    )


def test_the_simulator_reports_joins_leaves_and_spurious_transitions(meshchat: Meshchat) -> None:
    rows = meshchat.json("geofence", "simulate", "--workers", "4", "--hours", "2")
    assert isinstance(rows, list)
    by_kind = {row["kind"]: row for row in rows}
    assert by_kind["visitor"]["joins"] == by_kind["visitor"]["leaves"] == 4
    assert by_kind["fence-sitter"]["spurious_leaves"] == 0
    assert set(by_kind) == {"visitor", "fence-sitter", "passer-by"}
    assert "spurious" in meshchat("geofence", "simulate", "--workers", "2", "--hours", "1")


def test_config_and_replay_of_an_owntracks_recorder_file(
    meshchat: Meshchat, tmp_path: Path
) -> None:
    settings = meshchat.json("geofence", "config", "--join-delay", "5", "--push-waypoints")
    assert settings == {"join_delay_s": 5.0, "leave_delay_s": 120.0, "push_waypoints": True}
    lat, lon = (str(v) for v in PLANT)
    meshchat("site", "add", "plant-3", "--lat", lat, "--lon", lon, "--radius", "150")
    rec = tmp_path / "rec" / "carol" / "phone" / "2026-01.rec"
    rec.parent.mkdir(parents=True)
    lines = []
    for minute, east in ((0, 500), (1, 0), (2, 0), (10, 0), (20, 900), (21, 900), (25, 900)):
        fix_lat, fix_lon = offset(*PLANT, east, 0)
        payload = {"_type": "location", "lat": fix_lat, "lon": fix_lon, "acc": 10}
        payload["tst"] = 1_767_254_400 + minute * 60
        lines.append(f"2026-01-01T08:{minute:02d}:00Z\t*                 \t{json.dumps(payload)}")
    rec.write_text("\n".join([*lines, "garbage"]) + "\n")
    result = meshchat.run("geofence", "replay", str(rec), "--json")
    assert "2026-01.rec:8: skipped" in result.stderr
    changes = json.loads(result.stdout)
    assert changes == [
        {"change": "join", "site": "plant-3", "time": "2026-01-01 08:02:00Z", "user": "carol"},
        {"change": "leave", "site": "plant-3", "time": "2026-01-01 08:25:00Z", "user": "carol"},
    ]


async def test_the_standalone_worker_follows_an_external_broker(meshchat: Meshchat) -> None:
    lat, lon = (str(v) for v in PLANT)
    meshchat(
        "site", "add", "plant-3", "--lat", lat, "--lon", lon, "--radius", "150", "--dwell", "0"
    )
    meshchat("geofence", "config", "--join-delay", "0")
    env = os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200", "NO_COLOR": "1"}
    async with embedded_broker() as broker:
        url = f"mqtt://127.0.0.1:{broker.listener('mqtt').port}"
        process = subprocess.Popen(  # noqa: ASYNC220  # started once; a thread reads it
            [MESHCHAT, "geofence", "--broker", url, "--data", str(meshchat.data)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert process.stdout is not None
            reader = LineReader(process.stdout)
            line, _ = await asyncio.to_thread(read_line_matching, reader, "geofence ready")
            assert "1 sites" in line
            async with Transport(url, client_id="carol.phone") as phone:
                await phone.subscribe("mc/acme/sites/plant-3/_r")
                fix = {"_type": "location", "lat": PLANT[0], "lon": PLANT[1], "tst": time.time()}
                await phone.publish("owntracks/carol/phone", json.dumps(fix).encode())
                async with asyncio.timeout(20):
                    async for message in phone.messages():
                        envelope = decode(message.payload)
                        assert isinstance(envelope, Signed)
                        if b"carol" in envelope.payload:
                            break
            process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.wait, 20)
            assert code == 0, process.stderr.read() if process.stderr else ""
            assert "stopped." in "\n".join(reader.rest())
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
    with Directory.in_data_dir(meshchat.data) as directory:
        assert "carol" in directory.group("sites/plant-3").members
