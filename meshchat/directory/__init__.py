"""The org directory: org, departments, users, devices, groups, sites, RBAC and the audit log.

`meshchat.directory.signing` (the org's keys, signed rosters and key records) is deliberately
not re-exported here: the broker imports this package and must never load `meshchat.e2ee`.
"""

from meshchat.directory.audit import GENESIS, AuditEntry, chain_hash, verify_chain
from meshchat.directory.credentials import (
    hash_password,
    hash_token,
    mosquitto_hash,
    new_token,
    verify_password,
    verify_token,
)
from meshchat.directory.hrimport import (
    ImportFile,
    ImportPlan,
    ImportRow,
    plan_import,
    read_import,
)
from meshchat.directory.model import (
    Department,
    Device,
    Group,
    GroupKind,
    KeyRecordState,
    Permission,
    Role,
    RosterState,
    Site,
    User,
    UserStatus,
)
from meshchat.directory.policy import (
    SERVICE_PREFIX,
    AccessPolicy,
    Action,
    Decision,
    DirectorySnapshot,
    Principal,
    PrincipalKind,
    may_announce,
)
from meshchat.directory.rbac import DEPARTMENT_SCOPED, ROLE_PERMISSIONS, can, require
from meshchat.directory.schema import MIGRATIONS
from meshchat.directory.store import DIRECTORY_FILE, Directory, parse_group_path
from meshchat.directory.watch import DirectoryWatcher, PolicyListener

__all__ = [
    "DEPARTMENT_SCOPED",
    "DIRECTORY_FILE",
    "GENESIS",
    "MIGRATIONS",
    "ROLE_PERMISSIONS",
    "SERVICE_PREFIX",
    "AccessPolicy",
    "Action",
    "AuditEntry",
    "Decision",
    "Department",
    "Device",
    "Directory",
    "DirectorySnapshot",
    "DirectoryWatcher",
    "Group",
    "GroupKind",
    "ImportFile",
    "ImportPlan",
    "ImportRow",
    "KeyRecordState",
    "Permission",
    "PolicyListener",
    "Principal",
    "PrincipalKind",
    "Role",
    "RosterState",
    "Site",
    "User",
    "UserStatus",
    "can",
    "chain_hash",
    "hash_password",
    "hash_token",
    "may_announce",
    "mosquitto_hash",
    "new_token",
    "parse_group_path",
    "plan_import",
    "read_import",
    "require",
    "verify_chain",
    "verify_password",
    "verify_token",
]
