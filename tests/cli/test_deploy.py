"""`meshchat deploy mosquitto` as an admin runs it: the files, their modes, --json, errors."""

from __future__ import annotations

import json
import os
import pwd
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app


def _run(data: Path, *args: str, stdin: str | None = None, code: int = 0) -> str:
    result = CliRunner().invoke(app, [*args, "--data", str(data)], input=stdin)
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture
def data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    _run(
        data,
        "org",
        "init",
        "--org",
        "acme",
        "--admin",
        "root",
        "--password-stdin",
        stdin="s3cret-pass\n",
    )
    _run(data, "user", "add", "bob", "--dept", "ops", "--password-stdin", stdin="bob password\n")
    _run(data, "user", "add", "carol", "--dept", "ops")  # no password: cannot log in
    _run(data, "group", "create", "ops/line1")
    _run(data, "group", "add", "ops/line1", "bob")
    return data


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_deploy_writes_the_three_files_and_says_where_as_json(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "broker"
    report = json.loads(
        _run(data, "deploy", "mosquitto", "--out", str(out), "--port", "1884", "--json")
    )
    assert report["org"] == "acme"
    assert report["accounts"] == ["bob", "root", "svc.archive", "svc.geofence"]
    services = data / "services"
    assert report["services"] == {
        name: {"account": f"svc.{name}", "password_file": str(services / f"{name}.secret")}
        for name in ("archive", "geofence")
    }
    assert _mode(services) == 0o700
    assert _mode(services / "archive.secret") == 0o600
    assert report["files"] == {
        "conf": str(out / "mosquitto.conf"),
        "passwords": str(out / "passwd"),
        "acl": str(out / "acl"),
        "persistence": str(out / "persistence"),
    }
    assert report["start"] == f"mosquitto -c {out / 'mosquitto.conf'}"
    assert _mode(out / "passwd") == 0o600
    assert _mode(out / "acl") == 0o600
    assert _mode(out / "mosquitto.conf") == 0o644
    assert _mode(out / "persistence") == 0o700
    assert sorted(p.name for p in out.iterdir()) == [
        "acl",
        "mosquitto.conf",
        "passwd",
        "persistence",
    ]
    conf = (out / "mosquitto.conf").read_text()
    assert f"password_file {out / 'passwd'}\n" in conf
    assert "listener 1884 127.0.0.1\n" in conf
    assert "user bob\ntopic write mc/acme/_d/+\n" in (out / "acl").read_text()
    assert [line.split(":")[0] for line in (out / "passwd").read_text().splitlines()] == [
        "bob",
        "root",
        "svc.archive",
        "svc.geofence",
    ]
    # The secrets never reach the output, and a second run keeps them (same password file).
    secret = (services / "archive.secret").read_text().strip()
    assert secret not in json.dumps(report)
    passwd = (out / "passwd").read_text()
    _run(data, "deploy", "mosquitto", "--out", str(out), "--port", "1884", "--json")
    assert (out / "passwd").read_text() == passwd
    without = json.loads(
        _run(data, "deploy", "mosquitto", "--out", str(out), "--no-services", "--json")
    )
    assert without["accounts"] == ["bob", "root"]


def test_running_it_again_on_an_unchanged_directory_changes_nothing(
    data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "broker"
    _run(data, "deploy", "mosquitto", "--out", str(out))
    before = {name: (out / name).read_bytes() for name in ("mosquitto.conf", "passwd", "acl")}
    output = _run(data, "deploy", "mosquitto", "--out", str(out))
    assert {name: (out / name).read_bytes() for name in before} == before
    assert f"mosquitto -c {out / 'mosquitto.conf'}" in output
    assert "SIGHUP" in output


def test_as_root_the_secret_files_belong_to_the_user_mosquitto_runs_as(
    data: Path, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can hand files to another user")
    try:
        mosquitto = pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("there is no system user mosquitto (Debian's package creates it)")
    out = tmp_path / "broker"
    output = _run(data, "deploy", "mosquitto", "--out", str(out))
    assert "belong to mosquitto" in output
    for name in ("passwd", "acl", "persistence"):
        assert (out / name).stat().st_uid == mosquitto.pw_uid
    assert out.stat().st_gid == mosquitto.pw_gid
    assert "\nuser " not in (out / "mosquitto.conf").read_text()  # Mosquitto's own default
    refused = _run(
        data, "deploy", "mosquitto", "--out", str(out), "--run-as", "no-such-user", code=1
    )
    assert "no system user 'no-such-user'" in refused


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--tls-cert", "cert.pem"],
            "TLS needs both a certificate (--tls-cert) and its key (--tls-key)",
        ),
        (["--port", "70000"], "port 70000 is outside 1..65535"),
    ],
)
def test_unusable_options_fail_with_one_line(
    data: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    output = _run(data, "deploy", "mosquitto", "--out", str(tmp_path / "o"), *args, code=2)
    assert output.strip() == f"error: {message}"
    assert not (tmp_path / "o").exists()


def test_without_a_directory_it_says_how_to_make_one(tmp_path: Path) -> None:
    output = _run(tmp_path / "empty", "deploy", "mosquitto", "--out", str(tmp_path / "o"), code=1)
    assert "run `meshchat org init --org NAME` first" in output
