"""HR import: the file is the desired state of the org's people; the directory follows it.

A CSV file has a header line with the columns ``user`` and ``dept`` and optionally ``role`` and
``display_name``. A JSON file is a list of objects with those keys, or an object
``{"departments": [...], "users": [...]}`` that may also declare new departments.

`read_import` checks every row (names, roles, duplicates, encoding) and `plan_import` computes the
diff against the directory: onboard, move department, change role, change display name, offboard.
Nothing is written until `Directory.apply_import` applies a whole plan in one transaction.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from meshchat.directory.model import Role, User
from meshchat.errors import ImportFileError, TopicError
from meshchat.topics import RESERVED_DEPARTMENTS, validate_name

__all__ = [
    "ImportFile",
    "ImportPlan",
    "ImportRow",
    "plan_import",
    "read_import",
]

REQUIRED_COLUMNS: Final = ("user", "dept")
KNOWN_COLUMNS: Final = frozenset({"user", "dept", "role", "display_name"})
MAX_FILE_BYTES: Final = 64 * 1024 * 1024
MAX_DISPLAY_NAME: Final = 200


@dataclass(frozen=True, slots=True)
class ImportRow:
    """One person as the HR file wants them."""

    line: int
    user: str
    dept: str
    role: Role | None = None
    display_name: str | None = None


@dataclass(frozen=True, slots=True)
class ImportFile:
    """The checked content of an HR file."""

    rows: tuple[ImportRow, ...]
    departments: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ImportPlan:
    """The diff between an HR file and the directory."""

    departments: tuple[str, ...] = ()
    onboard: tuple[ImportRow, ...] = ()
    move: tuple[tuple[str, str, str], ...] = ()
    """(user, from department, to department)"""
    role: tuple[tuple[str, Role, Role], ...] = ()
    """(user, old role, new role)"""
    rename: tuple[tuple[str, str], ...] = ()
    """(user, new display name)"""
    offboard: tuple[str, ...] = ()
    unchanged: int = 0

    @property
    def empty(self) -> bool:
        """Whether applying the plan would change nothing."""
        return not (
            self.departments
            or self.onboard
            or self.move
            or self.role
            or self.rename
            or self.offboard
        )

    @property
    def changes(self) -> int:
        """How many changes the plan makes."""
        return sum(
            map(
                len,
                (self.departments, self.onboard, self.move, self.role, self.rename, self.offboard),
            )
        )

    def as_json(self) -> dict[str, Any]:
        """The plan for scripts."""
        return {
            "departments": list(self.departments),
            "onboard": [
                {"user": r.user, "dept": r.dept, "role": (r.role or Role.MEMBER).value}
                for r in self.onboard
            ],
            "move": [{"user": u, "from": a, "to": b} for u, a, b in self.move],
            "role": [{"user": u, "from": a.value, "to": b.value} for u, a, b in self.role],
            "rename": [{"user": u, "display_name": n} for u, n in self.rename],
            "offboard": list(self.offboard),
            "unchanged": self.unchanged,
        }


@dataclass
class _Reader:
    """Collects rows, checking each one, so the first bad row is reported with its line."""

    rows: list[ImportRow] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)

    def add(self, line: int, record: Mapping[str, object]) -> None:
        unknown = set(record) - KNOWN_COLUMNS
        if unknown:
            raise ImportFileError(
                f"line {line}: unknown field(s) {', '.join(sorted(unknown))}; expected "
                f"{', '.join(sorted(KNOWN_COLUMNS))}",
                line=line,
            )
        for column in REQUIRED_COLUMNS:
            value = record.get(column)
            if not isinstance(value, str) or not value.strip():
                raise ImportFileError(f"line {line}: the {column!r} field is missing", line=line)
        user = str(record["user"]).strip()
        dept = str(record["dept"]).strip()
        try:
            validate_name(user, "user name")
            validate_name(dept, "department name")
        except TopicError as exc:
            raise ImportFileError(f"line {line}: {exc}", line=line) from exc
        if dept in RESERVED_DEPARTMENTS:
            raise ImportFileError(f"line {line}: department {dept!r} is reserved", line=line)
        if user in self.seen:
            raise ImportFileError(
                f"line {line}: user {user!r} is listed twice (first on line {self.seen[user]})",
                line=line,
            )
        role = self._role(line, record.get("role"))
        display_name = record.get("display_name")
        if display_name is not None and (
            not isinstance(display_name, str) or len(display_name) > MAX_DISPLAY_NAME
        ):
            raise ImportFileError(
                f"line {line}: display_name must be text of at most {MAX_DISPLAY_NAME} characters",
                line=line,
            )
        self.seen[user] = line
        self.rows.append(ImportRow(line, user, dept, role, display_name))

    @staticmethod
    def _role(line: int, value: object) -> Role | None:
        if value is None or value == "":
            return None
        try:
            role = Role(str(value).strip())
        except ValueError:
            roles = ", ".join(r.value for r in Role if r is not Role.DEVICE)
            raise ImportFileError(
                f"line {line}: role {value!r} is unknown; expected one of {roles}", line=line
            ) from None
        if role is Role.DEVICE:
            raise ImportFileError(f"line {line}: devices are not imported from HR files", line=line)
        return role


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ImportFileError(
            f"line {line}: the file is not UTF-8 (byte {data[exc.start]:#04x} at offset "
            f"{exc.start}); export it as UTF-8",
            line=line,
        ) from exc


def _read_csv(text: str) -> ImportFile:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        raise ImportFileError(f"line 1: the header is not valid CSV: {exc}", line=1) from exc
    if not header:
        raise ImportFileError("line 1: the file is empty", line=1)
    columns = [name.strip() for name in header]
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        raise ImportFileError(
            f"line 1: the header lacks the column(s) {', '.join(missing)}", line=1
        )
    collected = _Reader()
    try:
        for record in reader:
            line = reader.line_num
            if None in record:
                raise ImportFileError(f"line {line}: more fields than the header has", line=line)
            cleaned = {key.strip(): (value or "").strip() for key, value in record.items()}
            if not any(cleaned.values()):
                continue  # blank line
            collected.add(
                line, {k: v for k, v in cleaned.items() if v != "" or k in REQUIRED_COLUMNS}
            )
    except csv.Error as exc:
        line = reader.line_num
        raise ImportFileError(f"line {line}: not valid CSV: {exc}", line=line) from exc
    return ImportFile(tuple(collected.rows))


_USERS_ARRAY: Final = re.compile(r'"users"\s*:\s*\[')


def _element_lines(text: str, top_is_list: bool) -> list[int]:
    """The line each user object starts on (json gives no positions, so walk the array once)."""
    if top_is_list:
        position = text.index("[") + 1
    else:
        # Top-level keys are only "departments" (strings) and "users" (checked after parsing),
        # so the first '"users": [' outside a string is the array of users.
        found = _USERS_ARRAY.search(text)
        assert found is not None
        position = found.end()
    decoder = json.JSONDecoder()
    lines: list[int] = []
    line, counted = 1, 0
    while True:
        while text[position] in " \t\r\n,":
            position += 1
        if text[position] == "]":
            return lines
        line += text.count("\n", counted, position)
        counted = position
        lines.append(line)
        _, position = decoder.raw_decode(text, position)


def _read_json(text: str) -> ImportFile:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportFileError(
            f"line {exc.lineno}: not valid JSON: {exc.msg}", line=exc.lineno
        ) from exc
    departments: list[object] = []
    top_is_list = isinstance(document, list)
    if isinstance(document, dict):
        unknown = set(document) - {"departments", "users"}
        if unknown or "users" not in document:
            raise ImportFileError(
                'the JSON object must have "users" (and may have "departments") only', line=1
            )
        departments = document.get("departments") or []
        document = document["users"]
    if not isinstance(document, list) or not isinstance(departments, list):
        raise ImportFileError("the JSON must be a list of users", line=1)
    for dept in departments:
        try:
            validate_name(dept, "department name")
        except TopicError as exc:
            raise ImportFileError(f"departments: {exc}", line=1) from exc
    lines = _element_lines(text, top_is_list=top_is_list)
    collected = _Reader()
    for index, record in enumerate(document):
        if not isinstance(record, dict):
            raise ImportFileError(
                f"line {lines[index]}: each user must be a JSON object", line=lines[index]
            )
        collected.add(lines[index], record)
    return ImportFile(tuple(collected.rows), frozenset(str(d) for d in departments))


def read_import(path: Path) -> ImportFile:
    """Read and check an HR file (``.csv`` or ``.json``).

    Raises:
        ImportFileError: the file cannot be read, or a row is bad; the message starts with its
            line number.
    """
    suffix = path.suffix.lower()
    if suffix not in {".csv", ".json"}:
        raise ImportFileError(f"{path.name}: expected a .csv or .json file")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ImportFileError(f"{path.name} is {size} bytes; the limit is {MAX_FILE_BYTES}")
        data = path.read_bytes()
    except OSError as exc:
        raise ImportFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    text = _decode(data)
    return _read_csv(text) if suffix == ".csv" else _read_json(text)


def plan_import(
    wanted: ImportFile,
    current: Mapping[str, User],
    departments: set[str],
    *,
    actor: str,
    keep: Callable[[User], bool] = lambda user: user.role is Role.DEVICE,
) -> ImportPlan:
    """The changes that make the directory match the file.

    Args:
        wanted: the checked HR file.
        current: every user of the directory (revoked ones too), by name.
        departments: the departments the directory has.
        actor: who imports; the plan never offboards them.
        keep: users the file does not manage (device accounts by default).

    Raises:
        ImportFileError: a row names an unknown department or a revoked account, or the file
            would offboard the importing admin.
    """
    known = departments | wanted.departments
    onboard, move, role, rename = [], [], [], []
    unchanged = 0
    for row in wanted.rows:
        if row.dept not in known:
            raise ImportFileError(
                f"line {row.line}: department {row.dept!r} is unknown; create it with "
                '`meshchat dept add` or list it under "departments" in a JSON file',
                line=row.line,
            )
        user = current.get(row.user)
        if user is None:
            onboard.append(row)
            continue
        if not user.active:
            raise ImportFileError(
                f"line {row.line}: user {row.user!r} was offboarded; pick a new name",
                line=row.line,
            )
        if keep(user):
            raise ImportFileError(
                f"line {row.line}: {row.user!r} is a {user.role.value} account, not a person",
                line=row.line,
            )
        changed = False
        if user.dept != row.dept:
            move.append((row.user, user.dept, row.dept))
            changed = True
        if row.role is not None and user.role is not row.role:
            role.append((row.user, user.role, row.role))
            changed = True
        if row.display_name is not None and row.display_name != user.display_name:
            rename.append((row.user, row.display_name))
            changed = True
        unchanged += not changed
    listed = {row.user for row in wanted.rows}
    offboard = sorted(
        name
        for name, user in current.items()
        if user.active and name not in listed and not keep(user)
    )
    if actor in offboard:
        raise ImportFileError(
            f"the file does not list {actor}, who is importing it: that would offboard you; "
            "add yourself to the file"
        )
    return ImportPlan(
        departments=tuple(sorted(wanted.departments - departments)),
        onboard=tuple(onboard),
        move=tuple(move),
        role=tuple(role),
        rename=tuple(rename),
        offboard=tuple(offboard),
        unchanged=unchanged,
    )
