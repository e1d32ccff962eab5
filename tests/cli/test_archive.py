"""`meshchat archive` and `meshchat audit decrypt` as an admin and an auditor run them.

A real org (root, compliance and identity keys on disk, devices with keys in the directory),
real E2EE sessions sending into two groups, one of which keeps compliance copies, and a real
archive file. Everything runs through the CLI, in-process.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cli import app
from meshchat.archive import ArchiveStore, classify
from meshchat.directory import Directory, Role
from meshchat.directory.signing import OrgKeys
from meshchat.e2ee import BoxKeyPair, DeviceSession, SigningKeyPair
from meshchat.envelope import GroupMessage, encode
from meshchat.topics import KeyTopic
from tests.e2ee.org import text

PASSPHRASE = "correct horse battery staple"
AUDITED, PLAIN = "mc/acme/ops/audited", "mc/acme/ops/plain"
SAID = {AUDITED: ["the valve on line 3 leaks", "shut it down"], PLAIN: ["lunch at noon?"]}


@dataclass(frozen=True)
class Site:
    data: Path
    passphrase_file: Path

    def run(self, *args: str, code: int = 0, env: dict[str, str] | None = None) -> Result:
        result = CliRunner().invoke(app, [*args, "--data", str(self.data)], env=env)
        assert result.exit_code == code, result.output
        return result

    def json(self, *args: str, code: int = 0) -> object:
        return json.loads(self.run(*args, "--json", code=code).stdout)


def _device(directory: Directory, user: str, name: str) -> tuple[SigningKeyPair, BoxKeyPair]:
    signing, box = SigningKeyPair.generate(), BoxKeyPair.generate()
    directory.add_device(user, name, owner=user, kind="phone")
    directory.set_device_keys(name, signing.public, box.public, actor=user)
    return signing, box


def _build(data: Path) -> None:
    """An org whose alice sent into ops/audited (compliance) and ops/plain, all archived."""
    data.mkdir(mode=0o700)
    now = time.time()
    with Directory(data / "directory.db") as directory:
        directory.init_org("acme", admin="root", password="root password")
        directory.add_user("root", "alice", dept="ops", role=Role.MANAGER)
        directory.add_user("root", "bob", dept="ops")
        directory.create_group("root", "ops/audited", compliance=True)
        directory.create_group("root", "ops/plain")
        for group in ("ops/audited", "ops/plain"):
            directory.add_members("root", group, ["alice", "bob"])
        keys = OrgKeys.create(data, "acme", PASSPHRASE)
        keys.ensure_identities(directory)
        signing, box = _device(directory, "alice", "a1")
        _device(directory, "bob", "b1")
        records = {user: keys.key_record(directory, user) for user in ("alice", "bob")}
        rosters = {
            topic: keys.roster(directory, topic.removeprefix("mc/acme/"), now)
            for topic in (AUDITED, PLAIN)
        }
    alice = DeviceSession(trust=keys.trust, user="alice", device="a1", signing=signing, box=box)
    for user, record in records.items():
        alice.on_key_record(user, record)
    for topic, roster in rosters.items():
        alice.on_roster(topic, roster)
    archived = [(KeyTopic("acme", user).topic, encode(record)) for user, record in records.items()]
    for topic, texts in SAID.items():
        for said in texts:
            outgoing = alice.encrypt(topic, text(said, int(now)), now=now)
            archived += [(o.topic, o.payload) for o in outgoing if o.topic == topic]
    with ArchiveStore(data / "archive.db") as store:
        received = time.time()  # after compliance was turned on (group.create), as it happens
        store.insert([classify(t, p, org="acme", received_at=received) for t, p in archived])


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("template") / "data"
    _build(data)  # the org keys take a second of argon2id: made once for the module
    return data


@pytest.fixture
def site(template: Path, tmp_path: Path) -> Site:
    data = tmp_path / "data"
    shutil.copytree(template, data)
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_text(PASSPHRASE + "\n", encoding="utf-8")
    return Site(data, passphrase_file)


def test_an_auditor_with_the_key_reads_an_exported_compliance_group(
    site: Site, tmp_path: Path
) -> None:
    out = tmp_path / "audited.jsonl"
    summary = site.json("archive", "export", "--group", "ops/audited", "--out", str(out))
    assert summary == {
        "out": str(out),
        "group": "ops/audited",
        "since": None,
        "until": None,
        "envelopes": 5,  # two key records, one compliance copy, two messages
        "key_records": 2,
        "compliance_copies": 0,
        "group_envelopes": 3,
    }
    assert site.json("archive", "verify", str(out)) == [
        {"what": str(out), "ok": True, "checked": 5, "problems": []}
    ]
    report = site.json(
        "audit", "decrypt", str(out), "--root-passphrase-file", str(site.passphrase_file)
    )
    assert isinstance(report, dict)
    assert [(m["user"], m["device"], m["kind"], m["fields"]) for m in report["messages"]] == [
        ("alice", "a1", "text", [said]) for said in SAID[AUDITED]
    ]
    assert (report["readable"], report["refused"]) == (2, [])
    human = site.run(
        "audit", "decrypt", str(out), env={"MESHCHAT_ROOT_PASSPHRASE": PASSPHRASE}
    ).stdout
    assert "the valve on line 3 leaks" in human
    assert "alice (a1)" in human
    assert "2 of 2 messages readable" in human
    # The export itself holds ciphertext only.
    assert not [said for said in SAID[AUDITED] if said in out.read_text()]


def test_a_group_without_compliance_shows_every_message_as_not_readable(
    site: Site, tmp_path: Path
) -> None:
    out = tmp_path / "plain.jsonl"
    site.run("archive", "export", "--group", "ops/plain", "--out", str(out), "--since", "1d")
    report = site.json(
        "audit", "decrypt", str(out), "--root-passphrase-file", str(site.passphrase_file)
    )
    assert isinstance(report, dict)
    messages = report["messages"]
    assert len(messages) == len(SAID[PLAIN])
    assert all(not m["readable"] and m["fields"] == [] for m in messages)
    assert all("no compliance copy" in m["reason"] for m in messages)
    human = site.run(
        "audit", "decrypt", str(out), "--root-passphrase-file", str(site.passphrase_file)
    ).stdout
    assert "0 of 1 messages readable" in human
    assert "lunch" not in human


def test_audit_decrypt_refuses_a_wrong_passphrase_and_a_damaged_export_in_one_line(
    site: Site, tmp_path: Path
) -> None:
    out = tmp_path / "audited.jsonl"
    site.run("archive", "export", "--group", "ops/audited", "--out", str(out))
    wrong = site.run(
        "audit", "decrypt", str(out), code=1, env={"MESHCHAT_ROOT_PASSPHRASE": "not the one!!"}
    )
    assert wrong.output.startswith("error:")
    assert "Traceback" not in wrong.output
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-2] + lines[-1:]) + "\n")  # a message went missing
    damaged = site.run(
        "audit", "decrypt", str(out), "--root-passphrase-file", str(site.passphrase_file), code=1
    )
    assert "failed its integrity check" in damaged.output
    assert site.run("archive", "verify", str(out), code=1).output.count("problem") >= 1
    missing = site.run("audit", "decrypt", str(tmp_path / "nope.jsonl"), code=1)
    assert "cannot read" in missing.output


def test_verify_checks_the_database_and_fails_on_a_damaged_row(site: Site) -> None:
    assert site.json("archive", "verify")[0]["ok"] is True  # type: ignore[index]  # a list
    with sqlite3.connect(site.data / "archive.db") as conn:
        conn.execute("UPDATE envelopes SET chain_index = chain_index + 1 WHERE id = 3")
    result = site.run("archive", "verify", code=1)
    assert "row 3: index says" in result.output


def test_verify_fails_on_a_row_that_claims_another_org(site: Site) -> None:
    with sqlite3.connect(site.data / "archive.db") as conn:
        conn.execute(
            "UPDATE envelopes SET topic = replace(topic, 'mc/acme/', 'mc/evil/') WHERE id = 3"
        )
    result = site.run("archive", "verify", code=1)
    assert "row 3: not an envelope of acme's archive" in result.output
    assert "belongs to another org" in result.output
    report = site.json("archive", "verify", code=1)
    assert isinstance(report, list)
    assert [(check["ok"], len(check["problems"])) for check in report] == [(False, 1)]
    # Without the directory the org is the one most rows name: the first row moved to another
    # org is the one damaged row, not the reason every other row looks foreign.
    (site.data / "directory.db").unlink()
    with sqlite3.connect(site.data / "archive.db") as conn:
        first = conn.execute("SELECT MIN(id) FROM envelopes").fetchone()[0]
        conn.execute(
            "UPDATE envelopes SET topic = replace(topic, 'mc/acme/', 'mc/evil/') WHERE id = ?",
            (first,),
        )
    alone = site.json("archive", "verify", code=1)
    assert isinstance(alone, list)
    assert [(check["ok"], len(check["problems"])) for check in alone] == [(False, 2)]


def test_the_compliance_report_finds_a_chain_without_a_copy(site: Site) -> None:
    clean = site.json("archive", "compliance")
    assert clean == {"ok": True, "groups": clean["groups"], "chains_checked": 1, "missing": []}  # type: ignore[index]  # a dict
    with ArchiveStore(site.data / "archive.db") as store:
        rogue = encode(GroupMessage(77, 0, b"\x00" * 40, b"\x00" * 64))
        store.insert([classify(AUDITED, rogue, org="acme", received_at=time.time())])
    report = site.json("archive", "compliance", code=1)
    assert isinstance(report, dict)
    assert [(m["group"], m["chain_id"], m["messages"]) for m in report["missing"]] == [
        ("ops/audited", 77, 1)
    ]
    assert (
        "1 of 2 chains have no compliance copy" in site.run("archive", "compliance", code=1).stdout
    )


def test_retention_from_the_command_line_deletes_and_audits(site: Site) -> None:
    with Directory(site.data / "directory.db") as directory:
        directory.set_policy("root", "ops/plain", retention_days=1)
        directory.set_policy("root", "ops/audited", retention_days=1, legal_hold=True)
    with sqlite3.connect(site.data / "archive.db") as conn:
        conn.execute("UPDATE envelopes SET received_at = received_at - 3 * 86400")
    report = site.json("archive", "retention")
    assert isinstance(report, dict)
    assert (report["deleted"], report["held"]) == ({"ops/plain": 1}, ["ops/audited"])
    audit = site.json("audit", "show", "--last", "1")
    assert isinstance(audit, list)
    assert audit[0]["action"] == "archive.retention"


def test_errors_are_one_line_and_name_what_is_wrong(tmp_path: Path) -> None:
    empty = Site(tmp_path / "empty", tmp_path / "none")
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "x.jsonl")
    for args, says in [
        (("archive", "export", "--group", "ops/a", "--out", out), "no archive at"),
        (("archive", "export", "--group", "nope", "--out", out), "must be written DEPT/GROUP"),
        (
            ("archive", "export", "--group", "ops/a", "--out", out, "--since", "soon"),
            "not understood",
        ),
        (("archive", "verify"), "no archive at"),
        (("archive", "compliance"), "no directory"),
        (("archive", "--retention-every", "often"), "not understood"),
        (("archive",), "no directory in"),
    ]:
        result = empty.run(
            *args, code=2 if "--group" in args and "nope" in args else result_code(args)
        )
        assert says in result.output, result.output
        assert "Traceback" not in result.output
        assert result.output.count("error:") == 1


def result_code(args: tuple[str, ...]) -> int:
    return 2 if ("--since" in args or args == ("archive",)) else 1


def test_an_empty_archive_without_a_directory_verifies_as_intact(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    ArchiveStore(data / "archive.db").close()
    checked = Site(data, tmp_path / "none").json("archive", "verify")
    assert isinstance(checked, list)
    assert [(c["ok"], c["checked"]) for c in checked] == [(True, 0)]
