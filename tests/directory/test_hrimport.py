"""HR import: the file is the desired state; dry runs write nothing; bad rows name their line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshchat.directory import Directory, Role, read_import
from meshchat.errors import ImportFileError, PermissionDeniedError

HEADER = "user,dept,role,display_name\n"


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def state(directory: Directory) -> list[tuple[str, str, str, str]]:
    return [
        (u.name, u.dept, u.role.value, u.status.value)
        for u in directory.users(include_revoked=True)
    ]


def test_import_onboards_moves_changes_roles_and_offboards(
    directory: Directory, tmp_path: Path
) -> None:
    directory.create_group("bob", "ops/line1")
    directory.add_members("bob", "ops/line1", ["carol"])
    hr = write(
        tmp_path,
        "hr.csv",
        HEADER
        + "root,admin,admin,Root\n"
        + "bob,finance,member,Bob Builder\n"
        + "erin,ops,,Erin\n"
        + "dave,finance,manager,\n",
    )
    plan = directory.apply_import("root", read_import(hr))
    assert [row.user for row in plan.onboard] == ["erin"]
    assert plan.move == (("bob", "ops", "finance"),)
    assert plan.role == (("bob", Role.MANAGER, Role.MEMBER), ("dave", Role.MEMBER, Role.MANAGER))
    assert plan.offboard == ("carol",)
    assert state(directory) == [
        ("bob", "finance", "member", "active"),
        ("carol", "ops", "member", "revoked"),
        ("dave", "finance", "manager", "active"),
        ("erin", "ops", "member", "active"),
        ("root", "admin", "admin", "active"),
    ]
    assert directory.user("bob").display_name == "Bob Builder"
    group = directory.group("ops/line1")
    assert "carol" not in group.members
    assert group.rotation_pending
    assert directory.audit_entries()[-1].action == "org.import"
    assert directory.verify_audit() > 0


def test_reimporting_the_same_file_changes_nothing(directory: Directory, tmp_path: Path) -> None:
    hr = write(tmp_path, "hr.csv", HEADER + "root,admin,admin,\nbob,ops,manager,\nerin,ops,,\n")
    assert not directory.apply_import("root", read_import(hr)).empty
    rows, audit = state(directory), len(directory.audit_entries())
    again = directory.apply_import("root", read_import(hr))
    assert again.empty
    assert again.unchanged == 3
    assert state(directory) == rows
    assert len(directory.audit_entries()) == audit


def test_dry_run_plan_writes_nothing(directory: Directory, tmp_path: Path) -> None:
    hr = write(tmp_path, "hr.csv", HEADER + "root,admin,admin,\nerin,ops,,\n")
    rows, audit = state(directory), len(directory.audit_entries())
    plan = directory.plan_import("root", read_import(hr))
    assert [r.user for r in plan.onboard] == ["erin"]
    assert plan.offboard == ("bob", "carol", "dave")
    assert state(directory) == rows
    assert len(directory.audit_entries()) == audit


@pytest.mark.parametrize(
    ("content", "line", "words"),
    [
        (HEADER + "root,admin,admin,\nerin,legal,,\n", 3, "department 'legal' is unknown"),
        (
            HEADER + "root,admin,admin,\nerin,ops,,\nerin,finance,,\n",
            4,
            "listed twice (first on line 3)",
        ),
        ("user,role\nroot,admin\n", 1, "lacks the column(s) dept"),
        (HEADER + "root,admin,admin,\nErin,ops,,\n", 3, "upper-case letter 'E'"),
        (HEADER + "root,admin,admin,\nerin,ops,boss,\n", 3, "role 'boss' is unknown"),
        (HEADER + "root,admin,admin,\nerin,ops,device,\n", 3, "devices are not imported"),
        (HEADER + "root,admin,admin,\nerin,,,\n", 3, "'dept' field is missing"),
        (HEADER + "root,admin,admin,\nerin,ops,,x,extra\n", 3, "more fields than the header"),
        (HEADER + "root,admin,admin,\nerin,sites,,\n", 3, "reserved"),
        (HEADER + "bob,ops,manager,\n", 0, "would offboard you"),
        ("", 1, "the file is empty"),
    ],
)
def test_bad_rows_name_their_line_and_nothing_is_written(
    directory: Directory, tmp_path: Path, content: str, line: int, words: str
) -> None:
    rows, audit = state(directory), len(directory.audit_entries())
    hr = write(tmp_path, "hr.csv", content)
    with pytest.raises(ImportFileError) as caught:
        directory.apply_import("root", read_import(hr))
    assert words in str(caught.value)
    assert caught.value.line == line
    if line:
        assert str(caught.value).startswith(f"line {line}: ")
    assert state(directory) == rows
    assert len(directory.audit_entries()) == audit


def test_bad_encoding_names_the_line(tmp_path: Path) -> None:
    hr = write(tmp_path, "hr.csv", HEADER.encode() + b"root,admin,admin,\nj\xf6rg,ops,,\n")
    with pytest.raises(ImportFileError, match=r"line 3: the file is not UTF-8") as caught:
        read_import(hr)
    assert caught.value.line == 3


def test_revoked_user_cannot_be_reimported_under_the_same_name(
    directory: Directory, tmp_path: Path
) -> None:
    directory.remove_user("root", "carol")
    hr = write(tmp_path, "hr.csv", HEADER + "root,admin,admin,\ncarol,ops,,\n")
    with pytest.raises(ImportFileError, match="line 3: user 'carol' was offboarded"):
        directory.plan_import("root", read_import(hr))


def test_json_file_may_declare_departments(directory: Directory, tmp_path: Path) -> None:
    document = {
        "departments": ["legal"],
        "users": [
            {"user": "root", "dept": "admin", "role": "admin"},
            {"user": "lena", "dept": "legal", "display_name": "Lena L"},
        ],
    }
    hr = write(tmp_path, "hr.json", json.dumps(document, indent=2))
    plan = directory.apply_import("root", read_import(hr))
    assert plan.departments == ("legal",)
    assert directory.user("lena").dept == "legal"


def test_json_bad_row_names_its_line(tmp_path: Path) -> None:
    users = [{"user": "root", "dept": "admin"}, {"user": "bob", "dept": "ops"}, {"user": "x"}]
    hr = write(tmp_path, "hr.json", json.dumps(users, indent=2))
    with pytest.raises(ImportFileError) as caught:
        read_import(hr)
    # indent=2 puts each object on 4 lines after the opening bracket: the third starts on line 10
    assert caught.value.line == 10
    assert str(caught.value) == "line 10: the 'dept' field is missing"


def test_only_admins_import(directory: Directory, tmp_path: Path) -> None:
    hr = write(tmp_path, "hr.csv", HEADER + "bob,ops,manager,\n")
    with pytest.raises(PermissionDeniedError, match=r"org\.import"):
        directory.plan_import("bob", read_import(hr))


def test_device_accounts_are_never_offboarded(directory: Directory, tmp_path: Path) -> None:
    directory.add_user("root", "van-7", dept="ops", role=Role.DEVICE)
    hr = write(tmp_path, "hr.csv", HEADER + "root,admin,admin,\n")
    plan = directory.apply_import("root", read_import(hr))
    assert "van-7" not in plan.offboard
    assert directory.user("van-7").active


def test_wrong_file_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImportFileError, match=r"expected a \.csv or \.json file"):
        read_import(write(tmp_path, "hr.xlsx", "x"))
