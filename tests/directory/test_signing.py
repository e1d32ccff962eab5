"""The directory's keys: created private, trusted by clients, signing rosters and key records."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from meshchat.directory import Directory, GroupKind
from meshchat.directory.signing import (
    GEOFENCE_SIGNER,
    ROSTER_REFRESH,
    ROSTER_TTL,
    OrgKeys,
    generate_passphrase,
)
from meshchat.e2ee import (
    GENESIS_HASH,
    BoxKeyPair,
    KeyRecord,
    KeyStore,
    Roster,
    SigningKeyPair,
    WrongPassphraseError,
)
from meshchat.e2ee.trust import DIRECTORY_SIGNER, OrgTrust
from meshchat.envelope import Signed, decode, encode
from meshchat.errors import (
    AlreadyExistsError,
    ConfigError,
    DirectoryError,
    NotFoundError,
    PermissionDeniedError,
)

PASSPHRASE = "a long org root passphrase"
NOW = 1_800_000_000
DAY = 24 * 3600
LINE1 = "mc/acme/ops/line1"
ORG_FILES = {"root.key", "compliance.key", "directory.key", "geofence.key", "trust.bin"}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One set of org keys for "acme" (argon2id is slow on purpose), copied into each test."""
    data = tmp_path_factory.mktemp("template")
    OrgKeys.create(data, "acme", PASSPHRASE)
    return data / "keys"


@pytest.fixture
def keys(template: Path, directory: Directory) -> OrgKeys:
    """The org keys in the data directory of the `directory` fixture."""
    shutil.copytree(template, directory.path.parent / "keys")
    return OrgKeys.open(directory.path.parent)


def wire(envelope: Signed) -> Signed:
    """What a client receives: the envelope through the wire codec."""
    received = decode(encode(envelope))
    assert isinstance(received, Signed)
    return received


def roster_of(envelope: Signed) -> Roster:
    return Roster.decode(envelope.payload)


def add_phone(directory: Directory, owner: str, name: str) -> tuple[bytes, bytes]:
    directory.add_device("root", name, owner=owner)
    signing, box = SigningKeyPair.generate().public, BoxKeyPair.generate().public
    directory.set_device_keys(name, signing, box, actor=owner)
    return signing, box


# -- creating and opening the org keys ---------------------------------------------------------


def test_keys_are_private_files_in_a_private_directory(template: Path) -> None:
    assert stat.S_IMODE(template.stat().st_mode) == 0o700
    assert {path.name for path in template.iterdir()} == ORG_FILES
    for path in template.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # no staging directory is left behind
    assert [path.name for path in template.parent.iterdir()] == ["keys"]


def test_trust_bundle_verifies_and_secrets_stay_sealed(template: Path) -> None:
    keys = OrgKeys.open(template.parent)
    trust = OrgTrust.decode((template / "trust.bin").read_bytes())
    assert trust == keys.trust
    assert trust.org == "acme"
    assert keys.fingerprint == trust.fingerprint
    assert [(c.name, c.scope) for c in trust.signers] == [
        (DIRECTORY_SIGNER, "mc/acme/"),
        (GEOFENCE_SIGNER, "mc/acme/sites/"),
    ]
    root = keys.root(PASSPHRASE)
    compliance = keys.compliance_secret(PASSPHRASE)
    assert root.public == trust.root
    assert trust.compliance is not None
    assert compliance.public == trust.compliance.public
    # the passphrase-protected files do not hold the secrets in the clear
    assert root.seed not in (template / "root.key").read_bytes()
    assert compliance.secret not in (template / "compliance.key").read_bytes()


def test_wrong_root_passphrase_is_refused(keys: OrgKeys) -> None:
    with pytest.raises(WrongPassphraseError):
        keys.root("not the root passphrase")
    with pytest.raises(WrongPassphraseError):
        keys.compliance_secret("not the root passphrase")


def test_existing_keys_are_never_overwritten(keys: OrgKeys) -> None:
    before = {path.name: path.read_bytes() for path in keys.path.iterdir()}
    with pytest.raises(AlreadyExistsError, match="never overwritten"):
        OrgKeys.create(keys.path.parent, "acme", PASSPHRASE)
    assert {path.name: path.read_bytes() for path in keys.path.iterdir()} == before


def test_a_short_passphrase_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 12 characters"):
        OrgKeys.create(tmp_path, "acme", "short")
    assert list(tmp_path.iterdir()) == []


def test_generated_passphrases_are_long_and_random() -> None:
    first, second = generate_passphrase(), generate_passphrase()
    assert first != second
    assert len(first.replace("-", "")) == 25


def test_open_without_keys_says_how_to_create_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="`meshchat org init` creates them"):
        OrgKeys.open(tmp_path)


def test_open_refuses_a_directory_key_the_bundle_did_not_certify(keys: OrgKeys) -> None:
    KeyStore(keys.path).save("directory.key", SigningKeyPair.generate().seed)
    with pytest.raises(ConfigError, match="does not match the trust bundle"):
        OrgKeys.open(keys.path.parent)


def test_keys_of_another_org_are_refused(keys: OrgKeys, tmp_path: Path) -> None:
    with Directory(tmp_path / "other.db") as other:
        other.init_org("globex", admin="root", password="another password")
        with pytest.raises(ConfigError, match="belong to 'acme'"):
            keys.ensure_identities(other)


# -- identity keys and key records ---------------------------------------------------------


def test_identity_keys_are_created_once_for_active_users(
    keys: OrgKeys, directory: Directory
) -> None:
    directory.remove_user("root", "dave")
    assert keys.ensure_identities(directory) == ["bob", "carol", "root"]
    assert keys.ensure_identities(directory) == []
    for user in ("bob", "carol", "root"):
        path = keys.path / f"identity.{user}.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not (keys.path / "identity.dave.key").exists()
    bob = keys.identity_public("bob")
    directory.add_user("root", "erin", dept="ops")
    assert keys.ensure_identities(directory) == ["erin"]
    assert OrgKeys.open(keys.path.parent).identity_public("bob") == bob


def test_key_record_is_accepted_by_the_trust_bundle(keys: OrgKeys, directory: Directory) -> None:
    keys.ensure_identities(directory)
    signing, box = add_phone(directory, "bob", "bob-phone")
    directory.add_device("root", "bob-laptop", owner="bob")  # no keys registered yet: not listed
    clients = keys.trust.key_directory()
    record = clients.accept(wire(keys.key_record(directory, "bob")), arrived_on_user="bob")
    assert record.identity == keys.identity_public("bob")
    assert [(d.name, d.signing, d.box) for d in record.devices] == [("bob-phone", signing, box)]


def test_key_record_version_rises_whenever_the_device_list_changes(
    keys: OrgKeys, directory: Directory
) -> None:
    keys.ensure_identities(directory)
    clients = keys.trust.key_directory()

    def publish() -> KeyRecord:
        return clients.accept(wire(keys.key_record(directory, "bob")), arrived_on_user="bob")

    first = publish()
    again = publish()
    assert (first.version, again.version) == (1, 1)
    add_phone(directory, "bob", "bob-phone")
    added = publish()
    assert added.version == 2
    assert [d.name for d in added.devices] == ["bob-phone"]
    directory.set_device_keys(
        "bob-phone", SigningKeyPair.generate().public, BoxKeyPair.generate().public, actor="bob"
    )
    assert publish().version == 3
    directory.revoke_device("bob", "bob-phone")
    revoked = publish()
    assert (revoked.version, revoked.devices) == (4, ())
    # the version survives a restart of the directory
    with Directory(directory.path) as reopened:
        assert KeyRecord.decode(keys.key_record(reopened, "bob").payload).version == 4


def test_key_record_needs_an_identity_key(keys: OrgKeys, directory: Directory) -> None:
    with pytest.raises(NotFoundError, match="'bob' has no identity key"):
        keys.key_record(directory, "bob")


def test_device_keys_are_checked_and_audited(directory: Directory) -> None:
    directory.add_device("root", "bob-phone", owner="bob")
    signing, box = SigningKeyPair.generate().public, BoxKeyPair.generate().public
    with pytest.raises(PermissionDeniedError, match=r"user\.manage"):
        directory.set_device_keys("bob-phone", signing, box, actor="carol")
    with pytest.raises(DirectoryError, match="32 bytes"):
        directory.set_device_keys("bob-phone", signing[:16], box, actor="bob")
    device = directory.set_device_keys("bob-phone", signing, box, actor="bob")
    assert (device.signing_public, device.box_public) == (signing, box)
    entry = directory.audit_entries()[-1]
    assert (entry.action, entry.target, entry.actor) == ("device.keys", "bob-phone", "bob")
    assert entry.details_dict == {"owner": "bob", "signing": signing.hex(), "box": box.hex()}
    directory.revoke_device("bob", "bob-phone")
    with pytest.raises(DirectoryError, match="revoked"):
        directory.set_device_keys("bob-phone", signing, box, actor="bob")


def test_no_secret_reaches_the_audit_log_or_the_directory_file(
    template: Path, directory: Directory
) -> None:
    shutil.copytree(template, directory.path.parent / "keys")
    keys = OrgKeys.open(directory.path.parent)
    keys.audit_creation(directory)
    keys.ensure_identities(directory)
    add_phone(directory, "bob", "bob-phone")
    keys.key_record(directory, "bob")
    directory.create_group("bob", "ops/line1")
    keys.roster(directory, "ops/line1", NOW)
    store = KeyStore(keys.path)
    secrets = [
        keys.root(PASSPHRASE).seed,
        keys.compliance_secret(PASSPHRASE).secret,
        *(store.load(name) or b"" for name in ("directory.key", "geofence.key")),
        *(store.load(f"identity.{user}.key") or b"" for user in ("root", "bob", "carol")),
    ]
    assert all(len(secret) == 32 for secret in secrets)
    entries = directory.audit_entries()
    assert {"org.keys", "user.identity", "device.keys"} <= {entry.action for entry in entries}
    audit_text = "\n".join(entry.details for entry in entries)
    assert keys.trust.root.hex() in audit_text  # public keys are recorded
    raw = directory.path.read_bytes()
    wal = directory.path.with_name(directory.path.name + "-wal")
    raw += wal.read_bytes() if wal.exists() else b""
    for secret in secrets:
        assert secret.hex() not in audit_text
        assert secret not in raw
    assert PASSPHRASE not in audit_text
    assert PASSPHRASE.encode() not in raw


# -- rosters ----------------------------------------------------------------------------------


def test_roster_is_accepted_by_the_trust_bundle(keys: OrgKeys, directory: Directory) -> None:
    directory.create_group("bob", "ops/line1")
    directory.add_members("bob", "ops/line1", ["carol"])
    envelope = wire(keys.roster(directory, "ops/line1", NOW))
    tracker = keys.trust.roster_tracker()
    roster = tracker.accept(envelope, arrived_on=LINE1)
    assert envelope.signer == DIRECTORY_SIGNER
    assert (roster.epoch, roster.prev, roster.members) == (1, GENESIS_HASH, ("bob", "carol"))
    assert (roster.issued_at, roster.expires_at) == (NOW, NOW + ROSTER_TTL)
    assert (roster.policy, roster.compliance) == (0, False)
    assert tracker.may_send(LINE1, now=NOW + ROSTER_TTL - 1)
    assert not tracker.may_send(LINE1, now=NOW + ROSTER_TTL)


def test_unchanged_roster_keeps_its_epoch(keys: OrgKeys, directory: Directory) -> None:
    directory.create_group("bob", "ops/line1")
    tracker = keys.trust.roster_tracker()
    first = keys.roster(directory, "ops/line1", NOW)
    later = keys.roster(directory, "ops/line1", NOW + DAY)
    assert later == first  # the same signed bytes: a retained re-publish changes nothing
    assert tracker.accept(wire(first), arrived_on=LINE1).epoch == 1
    assert tracker.accept(wire(later), arrived_on=LINE1).epoch == 1
    with Directory(directory.path) as reopened:
        assert roster_of(keys.roster(reopened, "ops/line1", NOW + 2 * DAY)).epoch == 1


def test_membership_changes_make_a_new_epoch_linked_to_the_last(
    keys: OrgKeys, directory: Directory
) -> None:
    directory.create_group("bob", "ops/line1")
    directory.add_members("bob", "ops/line1", ["carol"])
    tracker = keys.trust.roster_tracker()
    first = tracker.accept(wire(keys.roster(directory, "ops/line1", NOW)), arrived_on=LINE1)
    directory.remove_members("bob", "ops/line1", ["carol"])
    removed = tracker.accept(wire(keys.roster(directory, "ops/line1", NOW + 60)), arrived_on=LINE1)
    assert (removed.epoch, removed.prev, removed.members) == (2, first.hash, ("bob",))
    assert removed.issued_at == NOW + 60
    directory.add_members("bob", "ops/line1", ["dave"])
    added = tracker.accept(wire(keys.roster(directory, "ops/line1", NOW + 120)), arrived_on=LINE1)
    assert (added.epoch, added.prev, added.members) == (3, removed.hash, ("bob", "dave"))


def test_revoked_users_disappear_from_rosters(keys: OrgKeys, directory: Directory) -> None:
    directory.create_group("bob", "ops/line1")
    directory.add_members("bob", "ops/line1", ["carol", "dave"])
    assert roster_of(keys.roster(directory, "ops/line1", NOW)).members == ("bob", "carol", "dave")
    directory.remove_user("root", "carol")
    assert roster_of(keys.roster(directory, "ops/line1", NOW)).members == ("bob", "dave")
    # Even a revoked account whose membership row is still there is left out.
    directory.db.conn.execute("UPDATE users SET status = 'revoked' WHERE name = 'dave'")
    directory.db.conn.commit()
    roster = roster_of(keys.roster(directory, "ops/line1", NOW))
    assert (roster.epoch, roster.members) == (3, ("bob",))


def test_policy_changes_raise_the_policy_version(keys: OrgKeys, directory: Directory) -> None:
    directory.create_group("bob", "ops/line1")
    tracker = keys.trust.roster_tracker()
    first = tracker.accept(wire(keys.roster(directory, "ops/line1", NOW)), arrived_on=LINE1)
    directory.set_policy("root", "ops/line1", retention_days=30)
    retention = tracker.accept(wire(keys.roster(directory, "ops/line1", NOW)), arrived_on=LINE1)
    assert (retention.epoch, retention.policy, retention.compliance) == (2, 1, False)
    assert retention.prev == first.hash
    directory.set_policy("root", "ops/line1", compliance=True)
    compliance = tracker.accept(wire(keys.roster(directory, "ops/line1", NOW)), arrived_on=LINE1)
    assert (compliance.epoch, compliance.policy, compliance.compliance) == (3, 2, True)
    directory.set_policy("root", "ops/line1", retention_days=30, compliance=True)  # no change
    assert roster_of(keys.roster(directory, "ops/line1", NOW)).epoch == 3
    assert directory.group("ops/line1").policy_version == 2


def test_an_unchanged_roster_is_renewed_before_it_expires(
    keys: OrgKeys, directory: Directory
) -> None:
    directory.create_group("bob", "ops/line1")
    tracker = keys.trust.roster_tracker()
    first = tracker.accept(wire(keys.roster(directory, "ops/line1", NOW)), arrived_on=LINE1)
    not_yet = NOW + ROSTER_TTL - ROSTER_REFRESH
    assert roster_of(keys.roster(directory, "ops/line1", not_yet)).epoch == 1
    due = not_yet + 1
    renewed = tracker.accept(wire(keys.roster(directory, "ops/line1", due)), arrived_on=LINE1)
    # The next epoch: a client holding epoch 1 refuses a different roster claiming epoch 1.
    assert (renewed.epoch, renewed.prev, renewed.members) == (2, first.hash, first.members)
    assert (renewed.policy, renewed.compliance) == (first.policy, first.compliance)
    assert renewed.expires_at == due + ROSTER_TTL
    assert tracker.may_send(LINE1, now=NOW + ROSTER_TTL + DAY)


def test_a_temporary_groups_roster_never_outlives_the_group(
    keys: OrgKeys, directory: Directory
) -> None:
    ends = NOW + 2 * DAY
    directory.create_group("bob", "ops/shift", kind=GroupKind.TEMPORARY, expires_at=ends)
    roster = roster_of(keys.roster(directory, "ops/shift", NOW))
    assert roster.expires_at == ends
    # near its end it is not renewed again and again: it cannot be extended
    assert roster_of(keys.roster(directory, "ops/shift", ends - 60)).epoch == 1


def test_site_channels_are_signed_by_the_geofence_key_when_asked(
    keys: OrgKeys, directory: Directory
) -> None:
    directory.add_site("root", "plant-3", lat=48.1, lon=11.5, radius_m=200)
    directory.create_group("bob", "ops/line1")
    tracker = keys.trust.roster_tracker()
    by_geofence = wire(keys.roster(directory, "sites/plant-3", NOW, signer="geofence"))
    assert by_geofence.signer == GEOFENCE_SIGNER
    assert tracker.accept(by_geofence, arrived_on="mc/acme/sites/plant-3").epoch == 1
    assert keys.roster(directory, "sites/plant-3", NOW).signer == DIRECTORY_SIGNER
    with pytest.raises(DirectoryError, match="site channels only"):
        keys.roster(directory, "ops/line1", NOW, signer="geofence")


def test_roster_of_an_unknown_group(keys: OrgKeys, directory: Directory) -> None:
    with pytest.raises(NotFoundError, match="no group 'ops/nope'"):
        keys.roster(directory, "ops/nope", NOW)
