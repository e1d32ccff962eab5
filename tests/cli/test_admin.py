"""The admin commands as a script runs them: exit codes, one-line errors and --json output."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app


class Meshchat:
    """Runs `meshchat ...` in-process against one data directory."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.runner = CliRunner()

    def __call__(self, *args: str, stdin: str | None = None, code: int = 0) -> str:
        result = self.runner.invoke(app, [*args, "--data", str(self.data)], input=stdin)
        assert result.exit_code == code, result.output
        return result.output

    def json(self, *args: str) -> object:
        return json.loads(self(*args, "--json"))


@pytest.fixture
def meshchat(tmp_path: Path) -> Meshchat:
    run = Meshchat(tmp_path / "data")
    run(
        "org", "init", "--org", "acme", "--admin", "root", "--password-stdin", stdin="s3cret-pass\n"
    )
    run("user", "add", "bob", "--dept", "ops", "--role", "manager")
    run("user", "add", "carol", "--dept", "ops")
    return run


def test_commands_need_an_org_first(tmp_path: Path) -> None:
    output = Meshchat(tmp_path / "empty")("user", "list", code=1)
    assert "run `meshchat org init --org NAME` first" in output


def test_org_init_without_a_password_source_fails_clearly(tmp_path: Path) -> None:
    output = Meshchat(tmp_path / "d")("org", "init", "--org", "acme", code=2)
    assert "--password-stdin" in output


def test_users_are_listed_as_json_without_secrets(meshchat: Meshchat) -> None:
    users = meshchat.json("user", "list")
    assert isinstance(users, list)
    assert [(u["name"], u["role"], u["dept"]) for u in users] == [
        ("bob", "manager", "ops"),
        ("carol", "member", "ops"),
        ("root", "admin", "it"),
    ]
    assert all("password_hash" not in u for u in users)


def test_group_lifecycle_through_the_cli(meshchat: Meshchat) -> None:
    meshchat("group", "create", "ops/line1", "--as", "bob", "--retention", "30d", "--compliance")
    meshchat("group", "add", "ops/line1", "carol", "--as", "bob")
    shown = meshchat.json("group", "show", "ops/line1")
    assert isinstance(shown, dict)
    assert shown["members"] == ["bob", "carol"]
    assert shown["retention_days"] == 30
    assert shown["compliance"] is True
    table = meshchat("group", "show", "ops/line1")
    created = datetime.fromtimestamp(float(str(shown["created_at"]))).astimezone()
    assert created.strftime("%Y-%m-%d %H:%M") in table  # a time a person reads, not a number
    meshchat("group", "remove", "ops/line1", "carol", "--as", "bob")
    listed = meshchat.json("group", "list", "--member", "bob")
    assert isinstance(listed, list)
    assert [(g["path"], g["rotation_pending"]) for g in listed] == [("ops/line1", True)]


def test_denied_action_names_the_missing_permission(meshchat: Meshchat) -> None:
    output = meshchat("group", "create", "ops/mine", "--as", "carol", code=1)
    assert output.strip() == (
        "error: permission denied: group.create for department ops is missing (carol is member)"
    )


def test_bad_arguments_are_usage_errors(meshchat: Meshchat) -> None:
    assert "--temporary and --expires go together" in meshchat(
        "group", "create", "ops/x", "--temporary", code=2
    )
    assert "duration 'soon'" in meshchat(
        "group", "create", "ops/x", "--temporary", "--expires", "soon", code=2
    )
    assert "upper-case letter 'X'" in meshchat("group", "create", "ops/X", code=1)


def test_site_from_geojson_polygon(meshchat: Meshchat, tmp_path: Path) -> None:
    geojson = tmp_path / "yard.geojson"
    ring = [[11.0, 48.0], [11.1, 48.0], [11.1, 48.1], [11.0, 48.1], [11.0, 48.0]]
    geojson.write_text(
        json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}})
    )
    meshchat("site", "add", "yard", "--polygon", str(geojson))
    meshchat("site", "add", "plant-3", "--lat", "48.1", "--lon", "11.5", "--radius", "200")
    sites = meshchat.json("site", "list")
    assert isinstance(sites, list)
    assert sites[1]["name"] == "yard"
    assert sites[1]["polygon"] == [[48.0, 11.0], [48.0, 11.1], [48.1, 11.1], [48.1, 11.0]]
    assert sites[0]["channel"] == "sites/plant-3"
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "Point", "coordinates": [1, 2]}')
    assert "expected a GeoJSON Polygon" in meshchat(
        "site", "add", "x", "--polygon", str(bad), code=1
    )


def test_offboarding_and_roles(meshchat: Meshchat) -> None:
    meshchat("group", "create", "ops/line1", "--as", "bob")
    meshchat("group", "add", "ops/line1", "carol", "--as", "bob")
    removed = meshchat.json("user", "remove", "carol")
    assert removed == {"user": "carol", "status": "revoked", "left_groups": ["ops/line1"]}
    assert "bob is now admin (ops)" in meshchat("role", "set", "bob", "admin")
    assert "bob is now member (ops)" in meshchat("role", "set", "bob", "member")
    assert "permission denied: group.create" in meshchat(
        "group", "create", "ops/x", "--as", "bob", code=1
    )
    roles = meshchat.runner.invoke(app, ["role", "list", "--json"])
    assert "group.create (own department)" in json.loads(roles.output)["manager"]


def test_audit_show_and_verify(meshchat: Meshchat) -> None:
    entries = meshchat.json("audit", "show", "--last", "4")
    assert isinstance(entries, list)
    assert [(e["action"], e["target"]) for e in entries] == [
        ("user.add", "bob"),
        ("user.identity", "bob"),
        ("user.add", "carol"),
        ("user.identity", "carol"),
    ]
    assert meshchat.json("audit", "verify") == {"ok": True, "rows": 10}
    with sqlite3.connect(meshchat.data / "directory.db") as conn:
        conn.execute("UPDATE audit SET target = 'mallory' WHERE seq = 5")
    output = meshchat("audit", "verify", code=1)
    assert "audit row 5 was edited" in output
    result = meshchat.runner.invoke(
        app, ["audit", "verify", "--json", "--data", str(meshchat.data)]
    )
    assert result.exit_code == 1
    assert json.loads(result.output)["first_bad_row"] == 5


def test_org_import_dry_run_then_apply(meshchat: Meshchat, tmp_path: Path) -> None:
    hr = tmp_path / "hr.csv"
    hr.write_text("user,dept,role\nroot,it,admin\nbob,ops,manager\nerin,ops,\n")
    preview = meshchat("org", "import", str(hr), "--dry-run")
    assert "onboard" in preview
    assert "offboard" in preview
    assert "would make 2 change(s)" in preview
    users = meshchat.json("user", "list")
    assert isinstance(users, list)
    assert [u["name"] for u in users] == ["bob", "carol", "root"]
    applied = meshchat.json("org", "import", str(hr))
    assert isinstance(applied, dict)
    assert applied["offboard"] == ["carol"]
    assert [o["user"] for o in applied["onboard"]] == ["erin"]
    assert "Nothing to change" in meshchat("org", "import", str(hr))


def test_org_import_bad_row_is_one_line_with_its_number(meshchat: Meshchat, tmp_path: Path) -> None:
    hr = tmp_path / "hr.csv"
    hr.write_text("user,dept\nroot,it\nerin,legal\n")
    output = meshchat("org", "import", str(hr), code=1)
    assert output.startswith("error: line 3: department 'legal' is unknown")
    meshchat("dept", "add", "legal")
    # erin joins legal; bob and carol, missing from the file, would be offboarded
    assert "would make 3 change(s)" in meshchat("org", "import", str(hr), "--dry-run")


def test_group_policy_changes_are_admin_only_and_audited(meshchat: Meshchat) -> None:
    meshchat("group", "create", "ops/line1", "--as", "bob")
    changed = meshchat.json("group", "policy", "ops/line1", "--retention", "3y", "--legal-hold")
    assert isinstance(changed, dict)
    assert (changed["retention_days"], changed["legal_hold"]) == (1095, True)
    denied = meshchat("group", "policy", "ops/line1", "--retention", "1d", "--as", "bob", code=1)
    assert "retention.manage" in denied
    entries = meshchat.json("audit", "show", "--last", "1")
    assert isinstance(entries, list)
    assert entries[0]["action"] == "group.policy"
    assert entries[0]["details"] == {"legal_hold": True, "retention_days": 1095}
    forever = meshchat.json("group", "policy", "ops/line1", "--retention", "forever")
    assert isinstance(forever, dict)
    assert forever["retention_days"] is None
