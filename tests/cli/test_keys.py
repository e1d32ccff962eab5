"""Org keys from the command line: `org init`, `user add`, `org import` and `meshchat up`."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cli import app
from meshchat.directory import Directory, Role
from meshchat.directory.signing import OrgKeys
from tests.cli.running import UpProcess

ENV = "MESHCHAT_ROOT_PASSPHRASE"
ADMIN_PASSWORD = "admin password\n"


def run(data: Path, *args: str, stdin: str = ADMIN_PASSWORD, **env: str | None) -> Result:
    """`meshchat ARGS --data DATA`, with no root passphrase in the environment unless given."""
    environment: dict[str, str | None] = {ENV: None}
    environment.update(env)
    return CliRunner().invoke(
        app, [*args, "--data", str(data)], input=stdin, env=environment, catch_exceptions=False
    )


def init(data: Path, *args: str, **env: str) -> Result:
    return run(data, "org", "init", "--org", "acme", "--password-stdin", *args, **env)


def test_org_init_generates_a_root_passphrase_and_prints_it_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = init(data)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "root passphrase:" in line]
    assert len(lines) == 1, result.output
    passphrase = lines[0].split("root passphrase:", 1)[1].strip()
    assert result.output.count(passphrase) == 1
    assert "Write this down" in result.output
    keys = OrgKeys.open(data)
    assert f"fingerprint: {keys.fingerprint}" in result.output
    assert keys.root(passphrase).public == keys.trust.root
    keys_dir = data / "keys"
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in keys_dir.iterdir())
    # the admin has an identity key, and the creation is audited without secrets
    assert keys.identity_public("admin")
    with Directory(data / "directory.db") as directory:
        actions = [entry.action for entry in directory.audit_entries()]
        details = "\n".join(entry.details for entry in directory.audit_entries())
    assert actions[-2:] == ["org.keys", "user.identity"]
    assert passphrase not in details


def test_org_init_json_includes_a_generated_passphrase_only(tmp_path: Path) -> None:
    generated = init(tmp_path / "a", "--json")
    assert generated.exit_code == 0, generated.output
    report = json.loads(generated.stdout)
    keys = OrgKeys.open(tmp_path / "a")
    assert report["fingerprint"] == keys.fingerprint
    assert keys.root(report["root_passphrase"]).public == keys.trust.root

    passphrase_file = tmp_path / "root-passphrase"
    passphrase_file.write_text("correct horse battery staple\n")
    given = init(tmp_path / "b", "--json", "--root-passphrase-file", str(passphrase_file))
    assert given.exit_code == 0, given.output
    report = json.loads(given.stdout)
    assert "root_passphrase" not in report
    assert "correct horse" not in given.output
    keys = OrgKeys.open(tmp_path / "b")
    assert report["fingerprint"] == keys.fingerprint
    assert keys.root("correct horse battery staple").public == keys.trust.root


def test_org_init_takes_the_root_passphrase_from_the_environment(tmp_path: Path) -> None:
    result = init(tmp_path / "data", **{ENV: "passphrase from the environment"})
    assert result.exit_code == 0, result.output
    assert "root passphrase" not in result.output
    keys = OrgKeys.open(tmp_path / "data")
    assert keys.root("passphrase from the environment").public == keys.trust.root


def test_org_init_refuses_a_short_root_passphrase_and_writes_nothing(tmp_path: Path) -> None:
    passphrase_file = tmp_path / "root-passphrase"
    passphrase_file.write_text("short\n")
    result = init(tmp_path / "data", "--root-passphrase-file", str(passphrase_file))
    assert result.exit_code == 2
    assert result.output.strip() == "error: the root passphrase must be at least 12 characters long"
    assert not (tmp_path / "data").exists()
    missing = init(tmp_path / "data", "--root-passphrase-file", str(tmp_path / "nope"))
    assert missing.exit_code == 2
    assert "cannot read it" in missing.output


def test_org_init_never_overwrites_org_keys(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert init(data).exit_code == 0
    before = (data / "keys" / "trust.bin").read_bytes()
    (data / "directory.db").unlink()
    again = init(data)
    assert again.exit_code == 1
    assert "already holds org keys; they are never overwritten" in again.output
    assert (data / "keys" / "trust.bin").read_bytes() == before
    assert not (data / "directory.db").exists()


def test_user_add_and_org_import_create_identity_keys(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert init(data).exit_code == 0
    added = run(data, "user", "add", "bob", "--dept", "ops", "--json")
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["identity_key"] is True
    path = data / "keys" / "identity.bob.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    hr = tmp_path / "people.csv"
    hr.write_text("user,dept\nadmin,it\nbob,ops\ncarol,ops\nerin,it\n")
    imported = run(data, "org", "import", str(hr), "--json")
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout)["identity_keys"] == ["carol", "erin"]
    keys = OrgKeys.open(data)
    assert keys.identity_public("carol") != keys.identity_public("erin")


def test_user_add_without_org_keys_says_who_creates_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    with Directory(data / "directory.db") as directory:
        directory.init_org("acme", admin="admin", password="admin password")
    result = run(data, "user", "add", "bob", "--dept", "ops")
    assert result.exit_code == 0, result.output
    assert "`meshchat up` creates them" in result.output
    assert not (data / "keys").exists()


@pytest.mark.timeout(90)
def test_up_creates_missing_org_keys_and_prints_the_passphrase_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    with Directory(data / "directory.db") as directory:
        directory.init_org("acme", admin="admin", password="admin password")
        directory.add_user("admin", "bob", dept="ops", role=Role.MEMBER)
    up = UpProcess(["--port", "0", "--data", str(data)])
    try:
        up.wait_ready()
        code, rest, err = up.stop()
    finally:
        up.kill()
    assert code == 0, err
    output = "\n".join([*up.stdout_lines, rest, err])
    lines = [line for line in up.stdout_lines if "root passphrase:" in line]
    assert len(lines) == 1, up.stdout_lines
    passphrase = lines[0].split("root passphrase:", 1)[1].strip()
    assert output.count(passphrase) == 1
    assert not any("password:" in line for line in up.stdout_lines)  # the org existed
    keys = OrgKeys.open(data)
    assert keys.org == "acme"
    assert any(keys.fingerprint in line for line in up.stdout_lines)
    assert keys.root(passphrase).public == keys.trust.root
    assert keys.identity_public("admin") != keys.identity_public("bob")

    again = UpProcess(["--port", "0", "--data", str(data)])
    try:
        again.wait_ready()
        assert not any("passphrase" in line for line in again.stdout_lines)
    finally:
        again.kill()
    assert OrgKeys.open(data).trust == keys.trust
