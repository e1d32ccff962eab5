"""Sites and their channels: geofence timing, and the memberships the geofence makes."""

from __future__ import annotations

import pytest

from meshchat.directory import AccessPolicy, Action, Directory, Principal, PrincipalKind, Role
from meshchat.errors import DirectoryError, NotFoundError, PermissionDeniedError


@pytest.fixture
def plant(directory: Directory) -> Directory:
    directory.add_site("root", "plant-3", lat=48.1, lon=11.5, radius_m=200, dwell_s=45)
    directory.add_user("root", "truck-7", dept="ops", role=Role.DEVICE)
    return directory


def test_a_sites_timing_is_stored_changed_and_audited(plant: Directory) -> None:
    site = plant.site("plant-3")
    assert (site.dwell_s, site.exit_dwell_s, site.hysteresis_m) == (45, None, None)
    changed = plant.set_site("root", "plant-3", exit_dwell_s=300, hysteresis_m=25)
    assert (changed.dwell_s, changed.exit_dwell_s, changed.hysteresis_m) == (45, 300, 25)
    assert plant.set_site("root", "plant-3", dwell_s=None).dwell_s is None
    actions = [(e.action, e.details) for e in plant.audit_entries()]
    assert ("site.add", '{"circle":true,"dwell_s":45}') in actions
    assert actions[-2:] == [
        ("site.set", '{"exit_dwell_s":300,"hysteresis_m":25}'),
        ("site.set", '{"dwell_s":null}'),
    ]
    with pytest.raises(PermissionDeniedError, match=r"site\.manage"):
        plant.set_site("carol", "plant-3", dwell_s=0)
    with pytest.raises(DirectoryError, match="exit dwell"):
        plant.set_site("root", "plant-3", exit_dwell_s=-1)


def test_sites_near_the_poles_are_refused(directory: Directory) -> None:
    with pytest.raises(DirectoryError, match="85"):
        directory.add_site("root", "camp", lat=88.0, lon=0.0, radius_m=100)


def test_the_geofence_adds_only_roles_that_allow_auto_join(plant: Directory) -> None:
    added, removed = plant.set_site_presence(
        "svc.geofence", "plant-3", ["carol", "bob", "truck-7", "nobody"]
    )
    assert (added, removed) == (["bob", "carol"], [])
    assert plant.group("sites/plant-3").members == {"bob", "carol"}
    assert plant.site_presence() == {"plant-3": {"bob", "carol"}}
    entry = plant.audit_entries(last=1)[0]
    assert (entry.actor, entry.action, entry.target) == ("svc.geofence", "site.presence", "plant-3")
    assert not plant.group("sites/plant-3").rotation_pending


def test_the_geofence_removes_only_its_own_members_and_rotation_follows(plant: Directory) -> None:
    plant.add_members("root", "sites/plant-3", ["dave"])  # an admin's member stays
    plant.set_site_presence("svc.geofence", "plant-3", ["carol", "bob"])
    # A join batch applies only joins: pending leaves wait for their own batch.
    assert plant.set_site_presence("svc.geofence", "plant-3", ["carol"], remove=False) == ([], [])
    assert plant.set_site_presence("svc.geofence", "plant-3", [], add=False) == (
        [],
        ["bob", "carol"],
    )
    group = plant.group("sites/plant-3")
    assert group.members == {"dave"}
    assert group.rotation_pending


def test_an_admins_add_makes_a_geofence_membership_the_admins(plant: Directory) -> None:
    plant.set_site_presence("svc.geofence", "plant-3", ["carol"])
    assert plant.add_members("root", "sites/plant-3", ["carol"]) == []  # a member already
    assert plant.site_presence() == {}
    # The change of hands is audited, once.
    kept = [e for e in plant.audit_entries() if e.action == "group.keep"]
    assert [(e.actor, e.target) for e in kept] == [("root", "sites/plant-3")]
    plant.add_members("root", "sites/plant-3", ["carol"])
    assert len([e for e in plant.audit_entries() if e.action == "group.keep"]) == 1
    assert plant.set_site_presence("svc.geofence", "plant-3", []) == ([], [])
    assert "carol" in plant.group("sites/plant-3").members


def test_a_role_change_takes_auto_join_away(plant: Directory) -> None:
    plant.set_site_presence("svc.geofence", "plant-3", ["carol"])
    plant.set_role("root", "carol", Role.DEVICE)
    assert plant.set_site_presence("svc.geofence", "plant-3", ["carol"]) == ([], ["carol"])


def test_presence_of_an_unknown_site_is_an_error(plant: Directory) -> None:
    with pytest.raises(NotFoundError):
        plant.set_site_presence("svc.geofence", "plant-9", ["carol"])


def test_only_the_geofence_may_push_commands_to_owntracks_phones(plant: Directory) -> None:
    policy = AccessPolicy(plant.snapshot({"geofence": "x", "archive": "y", "dir": "z"}))

    def may(service: str, topic: str) -> bool:
        principal = Principal(PrincipalKind.SERVICE, service, f"svc.{service}")
        return policy.authorize(principal, Action.PUBLISH, topic, now=0).allowed

    assert may("geofence", "owntracks/carol/phone/cmd")
    assert not may("geofence", "owntracks/carol/phone")  # never a fix in a phone's name
    assert not may("archive", "owntracks/carol/phone/cmd")
    assert not may("dir", "owntracks/carol/phone/cmd")
