"""The device session: what members, removed members, late joiners and attackers can read."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshchat.e2ee import (
    COMPLIANCE_RECIPIENT,
    ChainShare,
    ComplianceReader,
    Decrypted,
    DeviceSession,
    Direct,
    OutboundChain,
    PairKind,
    Refused,
    RosterError,
    SigningKeyPair,
    TrustError,
    Undecryptable,
    Waiting,
    WithheldReason,
    open_distribution,
    open_pairwise,
    seal_distribution,
    seal_pairwise,
    sign_roster,
)
from meshchat.e2ee.chain import advance
from meshchat.e2ee.session import MAX_READ_CHAINS, MAX_SENT_CHAINS, chain_part, sent_part
from meshchat.envelope import Distribution, GroupMessage, Sealed, Signed, decode, encode
from meshchat.errors import DecryptError, E2EEError
from meshchat.topics import InboxTopic, parse_topic
from tests.e2ee.org import DAY, LINE1, LINE2, NOW, Device, Net, Org, text


@pytest.fixture
def org() -> Org:
    org = Org()
    org.add_user("alice", "a1", "a2")
    org.add_user("bob", "b1")
    org.add_user("carol", "c1")
    return org


@pytest.fixture
def net(org: Org) -> Net:
    net = Net(org)
    for devices in org.devices.values():
        for device in devices:
            net.join(device)
    for user in org.devices:
        net.broadcast_record(user)
    net.broadcast_roster(LINE1, "alice", "bob")
    return net


def inbox_targets(net: Net, since: int = 0) -> list[str]:
    names = []
    for item in net.published[since:]:
        parsed = parse_topic(item.topic)
        if isinstance(parsed, InboxTopic):
            names.append(parsed.device)
    return names


def share_of(net: Net, device: Device, sender: str) -> ChainShare:
    """The chain position `device` was given by `sender` (opened with the device's own key)."""
    for item in net.published:
        parsed = parse_topic(item.topic)
        envelope = decode(item.payload)
        if (
            isinstance(parsed, InboxTopic)
            and parsed.device == device.name
            and isinstance(envelope, Distribution)
            and envelope.sender == sender
        ):
            sender_keys = next(d for ds in net.org.devices.values() for d in ds if d.name == sender)
            return open_distribution(
                envelope,
                org="acme",
                recipient=device.name,
                box_key=device.box,
                sender_key=sender_keys.signing.public,
            ).share
    raise AssertionError(f"no distribution from {sender} to {device.name}")


def test_members_and_the_senders_other_device_read_a_message(net: Net) -> None:
    net.send("a1", LINE1, "hello line 1")
    for device in ("a1", "a2", "b1"):
        assert net.texts(device) == ["hello line 1"]
    received = net.of("b1", Decrypted)[0]
    assert isinstance(received, Decrypted)
    assert (received.sender, received.device) == ("alice", "a1")
    assert net.texts("c1") == []  # not a member: the broker never delivered it


def test_a_new_chain_is_distributed_to_every_other_device_of_every_member(net: Net) -> None:
    net.send("a1", LINE1, "one")
    assert sorted(inbox_targets(net)) == ["a2", "b1"]
    mark = len(net.published)
    net.send("a1", LINE1, "two")
    assert inbox_targets(net, mark) == []  # same chain: no new distribution


def test_no_send_without_a_current_roster_that_lists_the_sender(net: Net) -> None:
    with pytest.raises(RosterError, match="no roster"):
        net.sessions["a1"].encrypt(LINE2, text("x"), now=NOW)
    with pytest.raises(RosterError, match="expired"):
        net.sessions["a1"].encrypt(LINE1, text("x"), now=NOW + 8 * DAY)
    with pytest.raises(RosterError, match="not a member"):
        net.sessions["c1"].encrypt(LINE1, text("x"), now=NOW)
    net.broadcast_roster(LINE1, "alice", "bob", announcement=True, announcers=("alice",))
    with pytest.raises(RosterError, match="announcement channel: only alice may post"):
        net.sessions["b1"].encrypt(LINE1, text("x"), now=NOW)
    assert net.sessions["a1"].may_send(LINE1, now=NOW) is None


def test_a_removed_member_reads_nothing_sent_after_removal(net: Net) -> None:
    net.send("a1", LINE1, "before")
    mark = len(net.published)
    net.broadcast_roster(LINE1, "alice")  # bob offboarded
    sent = net.send("a1", LINE1, "after")
    # The new chain went to alice's other device only: nothing to any of bob's devices.
    assert inbox_targets(net, mark) == ["a2"]
    assert net.texts("a2") == ["before", "after"]
    # Even if a broken broker still hands bob the message, he cannot read it.
    step = net.sessions["b1"].on_group_message(LINE1, sent.payload)
    assert step.events == [Waiting(LINE1, decode_id(sent.payload))]
    assert net.texts("b1") == ["before"]


def decode_id(payload: bytes) -> tuple[int, int]:
    envelope = decode(payload)
    assert isinstance(envelope, GroupMessage)
    return (envelope.chain_id, envelope.index)


def test_a_removed_member_asking_for_keys_is_told_it_is_not_a_member(net: Net, org: Org) -> None:
    sent = net.send("a1", LINE1, "before")
    chain_id, _ = decode_id(sent.payload)
    net.broadcast_roster(LINE1, "alice")
    bob = org.devices["bob"][0]
    a1 = org.devices["alice"][0]
    request = seal_pairwise(
        sender="b1",
        sender_key=bob.signing,
        recipient="a1",
        recipient_box=a1.box.public,
        kind=PairKind.KEY_REQUEST,
        fields=(LINE1, chain_id, 0),
    )
    step = net.sessions["a1"].on_inbox(encode(request))
    assert [item.topic for item in step.outgoing] == ["mc/acme/_d/b1"]
    answer = decode(step.outgoing[0].payload)
    assert isinstance(answer, Sealed)
    opened = open_pairwise(answer, recipient="b1", box_key=bob.box, sender_key=a1.signing.public)
    assert opened.kind is PairKind.WITHHELD
    assert opened.fields[-1] == WithheldReason.NOT_MEMBER.value


def test_every_byte_flip_is_rejected_and_the_original_still_reads(net: Net) -> None:
    net.hold_inbox_of.clear()
    net.send("a1", LINE1, "first")
    b1 = net.sessions["b1"]
    original = net.sessions["a1"].encrypt(LINE1, text("target"), now=NOW)[-1]
    for position in range(len(original.payload)):
        for bit in (0x01, 0x80):
            flipped = bytearray(original.payload)
            flipped[position] ^= bit
            step = b1.on_group_message(LINE1, bytes(flipped))
            assert not [e for e in step.events if isinstance(e, Decrypted)], position
    # Nothing above advanced or poisoned the chain: the real message still reads, once.
    events = b1.on_group_message(LINE1, original.payload).events
    assert [e.inner.fields for e in events if isinstance(e, Decrypted)] == [("target",)]
    assert b1.on_group_message(LINE1, original.payload).events == []  # redelivery: silent


def test_a_member_cannot_send_as_another_member(net: Net, org: Org) -> None:
    net.send("a1", LINE1, "genuine")
    bob = org.devices["bob"][0]
    share = share_of(net, bob, "a1")  # bob knows alice's chain key, not her chain signing key
    forged = OutboundChain(
        share.chain_id, 1, advance(share.chain_key, 1), SigningKeyPair.generate().seed, NOW
    )
    envelope = forged.encrypt(LINE1, b"\x00" + b"\x91\xce\x00\x00\x00\x01")
    step = net.sessions["a2"].on_group_message(LINE1, encode(envelope))
    assert [e.code for e in step.events if isinstance(e, Undecryptable)] == ["bad-signature"]


def test_a_message_replayed_onto_another_group_is_not_read(net: Net) -> None:
    net.broadcast_roster(LINE2, "alice", "bob")
    sent = net.send("a1", LINE1, "for line 1 only")
    net.send("a1", LINE2, "line 2 chat")
    step = net.sessions["b1"].on_group_message(LINE2, sent.payload)
    assert not [e for e in step.events if isinstance(e, Decrypted)]


def test_forged_unsigned_revoked_and_wrong_group_distributions_are_refused(
    net: Net, org: Org
) -> None:
    b1 = net.sessions["b1"]
    bob = org.devices["bob"][0]
    a1, a2 = org.devices["alice"]
    share = ChainShare(77, 0, bytes(32), SigningKeyPair.generate().public)

    def dist(sender: str, key: SigningKeyPair, group: str = LINE1) -> bytes:
        copies = seal_distribution(
            sender=sender,
            device_key=key,
            group_topic=group,
            share=share,
            recipients={"b1": bob.box.public},
        )
        return encode(copies["b1"])

    forged = b1.on_inbox(dist("a1", SigningKeyPair.generate()))
    assert "bad signature" in refusal(forged.events)
    unsigned = decode(dist("a1", a1.signing))
    assert isinstance(unsigned, Distribution)
    zeroed = dataclasses.replace(unsigned, sig=bytes(64))
    assert "bad signature" in refusal(b1.on_inbox(encode(zeroed)).events)
    # carol is not a member of line 1: her distribution for it is refused.
    carol = org.devices["carol"][0]
    assert "not a member" in refusal(b1.on_inbox(dist("c1", carol.signing)).events)
    # a2 leaves alice's device list: what it signs afterwards is refused.
    org.devices["alice"] = [a1]
    net.broadcast_record("alice")
    assert "revoked" in refusal(b1.on_inbox(dist("a2", a2.signing)).events)


def refusal(events: Sequence[object]) -> str:
    reasons = [e.reason for e in events if isinstance(e, Refused)]
    assert reasons, events
    return " ".join(reasons)


def test_a_resent_distribution_at_a_later_index_never_replaces_the_earlier_one(
    net: Net, org: Org
) -> None:
    b1 = net.sessions["b1"]
    a1 = org.devices["alice"][0]
    bob = org.devices["bob"][0]
    net.send("a1", LINE1, "m0")
    late = net.sessions["a1"].encrypt(LINE1, text("m1"), now=NOW)[-1]  # not delivered yet
    net.send("a1", LINE1, "m2")
    share = share_of(net, bob, "a1")
    later = ChainShare(share.chain_id, 3, advance(share.chain_key, 3), share.verify_key)
    again = seal_distribution(
        sender="a1",
        device_key=a1.signing,
        group_topic=LINE1,
        share=later,
        recipients={"b1": bob.box.public},
    )["b1"]
    assert b1.on_inbox(encode(again)).events == []
    events = b1.on_group_message(LINE1, late.payload).events
    assert [e.inner.fields for e in events if isinstance(e, Decrypted)] == [("m1",)]


def test_a_late_joiner_reads_from_joining_on_and_is_told_why_not_before(net: Net) -> None:
    history = [net.send("a1", LINE1, f"old {i}") for i in range(3)]
    net.broadcast_roster(LINE1, "alice", "bob", "carol", issued_at=NOW + 10)
    net.send("a1", LINE1, "welcome carol", now=NOW + 20)
    assert net.texts("c1") == ["welcome carol"]
    # carol scrolls back: the archive hands her the old messages.
    c1 = net.sessions["c1"]
    for item in history:
        net.take("c1", c1.on_group_message(LINE1, item.payload, history=True))
    net.run()
    withheld = net.of("c1", Undecryptable)
    assert [(e.message_id[1], e.reason) for e in withheld] == [
        (i, WithheldReason.BEFORE_JOIN.value) for i in range(3)
    ]
    assert c1.pending == 0
    assert net.texts("c1") == ["welcome carol"]


def test_the_join_race_is_resolved_by_a_key_request(net: Net, org: Org) -> None:
    net.send("a1", LINE1, "before carol")
    # The directory adds carol; everyone but alice's sending device sees the roster at once.
    envelope = org.roster(LINE1, "alice", "bob", "carol", issued_at=NOW + 10)
    net.deliver_roster(LINE1, envelope, ["a2", "b1", "c1"])
    net.send("a1", LINE1, "sent after carol joined", now=NOW + 20)
    assert [type(e) for e in net.events["c1"]] == [Waiting]
    # a1 catches up: it shares its current position with carol, who asks for the earlier key.
    net.deliver_roster(LINE1, envelope, ["a1"])
    assert net.texts("c1") == ["sent after carol joined"]
    assert net.of("c1", Undecryptable) == []
    assert net.sessions["c1"].pending == 0


def test_a_message_before_its_distribution_waits_and_is_then_read(net: Net) -> None:
    net.hold_inbox_of.add("b1")
    net.send("a1", LINE1, "overtook its key")
    assert net.texts("b1") == []
    assert net.sessions["b1"].pending == 1
    net.release()
    assert net.texts("b1") == ["overtook its key"]
    assert net.sessions["b1"].pending == 0


def test_compliance_copies_let_the_auditor_and_no_one_else_read(net: Net, org: Org) -> None:
    net.broadcast_roster(LINE1, "alice", "bob", policy=1, compliance=True)
    net.send("a1", LINE1, "on the record")
    net.send("b1", LINE1, "me too")
    archive = [(item.topic, item.payload) for item in net.published if item.topic == LINE1]
    records = [(f"mc/acme/_k/{user}", encode(org.record(user))) for user in org.devices]
    copies = [p for _, p in archive if isinstance(decode(p), Distribution)]
    assert len(copies) == 2  # one per chain, zero bytes per message
    reader = ComplianceReader(org.trust, org.compliance)
    read = [e for e in reader.read_all(records + archive) if isinstance(e, Decrypted)]
    assert sorted(str(e.inner.fields[0]) for e in read) == ["me too", "on the record"]
    # A member's own key does not open the compliance copy.
    bob = org.devices["bob"][0]
    envelope = decode(copies[0])
    assert isinstance(envelope, Distribution)
    a1 = org.devices["alice"][0]
    with pytest.raises(DecryptError):
        open_distribution(
            envelope,
            org="acme",
            recipient=COMPLIANCE_RECIPIENT,
            box_key=bob.box,
            sender_key=a1.signing.public,
        )
    with pytest.raises(TrustError):
        ComplianceReader(org.trust, bob.box)


def test_without_compliance_no_copy_is_made(net: Net, org: Org) -> None:
    net.send("a1", LINE1, "private")
    archive = [(item.topic, item.payload) for item in net.published if item.topic == LINE1]
    assert not [p for _, p in archive if isinstance(decode(p), Distribution)]
    reader = ComplianceReader(org.trust, org.compliance)
    events = reader.read_all(archive)
    assert [e.code for e in events if isinstance(e, Undecryptable)] == ["no-copy"]


def test_a_policy_change_rotates_and_an_add_does_not(net: Net) -> None:
    a1 = net.sessions["a1"]
    net.send("a1", LINE1, "one")
    first = a1.outbound_chain(LINE1)
    assert first is not None
    net.broadcast_roster(LINE1, "alice", "bob", "carol")
    net.send("a1", LINE1, "two")
    assert a1.outbound_chain(LINE1) == (first[0], 2)  # carol's arrival did not rotate
    net.broadcast_roster(LINE1, "alice", "bob", "carol", policy=2)
    net.send("a1", LINE1, "three")
    rotated = a1.outbound_chain(LINE1)
    assert rotated is not None
    assert rotated[0] != first[0]


def test_revoking_a_device_makes_every_member_rotate_without_it(net: Net, org: Org) -> None:
    net.send("a1", LINE1, "one")
    net.send("b1", LINE1, "two")
    org.devices["alice"] = org.devices["alice"][:1]  # a2 lost
    net.broadcast_record("alice")
    mark = len(net.published)
    net.send("a1", LINE1, "three")
    net.send("b1", LINE1, "four")
    assert sorted(inbox_targets(net, mark)) == ["a1", "b1"]  # a new chain each, none to a2
    assert net.texts("a2") == ["one", "two"]


def test_a_new_device_gets_the_current_position_without_a_rotation(net: Net, org: Org) -> None:
    net.send("a1", LINE1, "one")
    chain = net.sessions["a1"].outbound_chain(LINE1)
    phone = Device("b2", "bob")
    org.devices["bob"].append(phone)
    net.join(phone)
    for user in org.devices:
        net.take("b2", net.sessions["b2"].on_key_record(user, org.record(user)))
    net.deliver_roster(LINE1, sign_current(org, LINE1), ["b2"])
    net.broadcast_record("bob")
    net.send("a1", LINE1, "two")
    assert chain is not None
    assert net.sessions["a1"].outbound_chain(LINE1) == (chain[0], 2)
    assert net.texts("b2") == ["two"]


def sign_current(org: Org, group: str) -> Signed:
    return sign_roster(org.rosters[group], org.directory, "dir")


def test_rotation_after_1000_messages_and_after_7_days(net: Net) -> None:
    net.broadcast_roster(LINE1, "alice", "bob", expires_at=NOW + 30 * DAY)
    a1 = net.sessions["a1"]
    for _ in range(1000):
        a1.encrypt(LINE1, text("x"), now=NOW)
    first = a1.outbound_chain(LINE1)
    assert first is not None
    assert first[1] == 1000
    a1.encrypt(LINE1, text("x"), now=NOW)
    second = a1.outbound_chain(LINE1)
    assert second is not None
    assert second == (second[0], 1)
    assert second[0] != first[0]
    a1.encrypt(LINE1, text("x"), now=NOW + 7 * DAY)
    third = a1.outbound_chain(LINE1)
    assert third is not None
    assert third[0] != second[0]


def test_a_restored_state_starts_a_new_chain_and_keeps_the_seen_set(net: Net, org: Org) -> None:
    a1_device, b1_device = org.devices["alice"][0], org.devices["bob"][0]
    first = net.send("a1", LINE1, "one")
    saved_a1 = net.sessions["a1"].to_bytes()
    saved_b1 = net.sessions["b1"].to_bytes()
    second = net.send("a1", LINE1, "two")
    # Both devices crash and come back from the state saved after "one".
    net.sessions["a1"] = DeviceSession.from_bytes(
        saved_a1, trust=org.trust, signing=a1_device.signing, box=a1_device.box
    )
    b1 = DeviceSession.from_bytes(
        saved_b1, trust=org.trust, signing=b1_device.signing, box=b1_device.box
    )
    net.sessions["b1"] = b1
    assert b1.on_group_message(LINE1, first.payload).events == []  # seen before the crash
    assert [type(e) for e in b1.on_group_message(LINE1, second.payload).events] == [Decrypted]
    third = net.send("a1", LINE1, "three")
    ids = [decode_id(item.payload) for item in (first, second, third)]
    assert ids[2][0] != ids[0][0]  # a new chain: index 1 of the old chain is never reused
    assert net.texts("b1")[-1] == "three"


def test_history_rereads_never_alarm(net: Net) -> None:
    sent = net.send("a1", LINE1, "once")
    b1 = net.sessions["b1"]
    assert b1.on_group_message(LINE1, sent.payload, history=True).events == []


def test_direct_messages_reach_every_device_of_both_users(net: Net) -> None:
    outgoing = net.sessions["a1"].seal_direct("bob", text("psst"))
    net.queue.extend(outgoing)
    net.run()
    for device in ("b1", "a2"):
        direct = net.of(device, Direct)
        assert len(direct) == 1
        assert isinstance(direct[0], Direct)
        assert direct[0].inner.fields == ("psst",)
    with pytest.raises(E2EEError):
        net.sessions["a1"].seal_direct("nobody", text("x"))


def test_a_corrupt_state_file_is_a_clear_error(org: Org) -> None:
    device = org.devices["alice"][0]
    with pytest.raises(E2EEError, match="state"):
        DeviceSession.from_bytes(
            b"\x93\x01\x02", trust=org.trust, signing=device.signing, box=device.box
        )


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=300))
def test_malformed_input_on_any_path_never_crashes(payload: bytes) -> None:
    org = Org()
    org.add_user("alice", "a1")
    session = org.session(org.devices["alice"][0])
    session.on_group_message(LINE1, payload)
    session.on_inbox(payload)
    session.on_roster(LINE1, payload)
    session.on_key_record("alice", payload)
    if payload:
        session.on_roster(LINE1, Signed("dir", payload, bytes(64)))
        session.on_key_record("alice", Signed("alice", payload, bytes(64)))
    for candidate in (payload, b"\x21" + payload, b"\x41" + payload, b"\x61" + payload):
        session.on_group_message(LINE1, candidate)
        session.on_inbox(candidate)
    assert session.pending <= 2


def test_a_directory_rebinding_an_identity_is_reported_and_its_devices_get_nothing(
    net: Net, org: Org
) -> None:
    # The directory swaps bob's identity key and lists a device of its own choosing.
    org.identities["bob"] = SigningKeyPair.generate()
    rogue = Device("b-rogue", "bob")
    org.devices["bob"] = [rogue]
    net.broadcast_record("bob")
    assert "identity key" in refusal(net.events["a1"])
    mark = len(net.published)
    net.send("a1", LINE1, "still pinned")
    assert "b-rogue" not in inbox_targets(net, mark)
    # The pin survives a restart: the same record is refused again.
    a1_device = org.devices["alice"][0]
    restored = DeviceSession.from_bytes(
        net.sessions["a1"].to_bytes(), trust=org.trust, signing=a1_device.signing, box=a1_device.box
    )
    org.versions["bob"] += 1
    again = restored.on_key_record("bob", org.record("bob"))
    assert "identity key" in refusal(again.events)
    assert restored.keys.device("bob", "b-rogue") is None


def test_saving_in_parts_writes_only_what_a_step_touched_and_restores_the_same_session(
    net: Net, org: Org
) -> None:
    b1, a1 = net.sessions["b1"], net.sessions["a1"]
    first = b1.take_changes()  # the first save: everything
    assert first.whole
    assert {"core", "records", "rosters"} <= set(first.parts)
    saved = dict(first.parts)
    mine = dict(a1.take_changes().parts)
    for round_ in range(3):  # three chains of alice's: a policy change rotates each time
        net.send("a1", LINE1, f"round {round_}")
        net.broadcast_roster(LINE1, "alice", "bob", policy=round_ + 1)
        saved.update(b1.take_changes().parts)
        mine.update(a1.take_changes().parts)
    assert len([name for name in saved if name.startswith("chain:")]) == 3
    assert len([name for name in mine if name.startswith("sent:")]) == 3
    sent = net.send("a1", LINE1, "one more")
    chain_id = decode_id(sent.payload)[0]
    changed = b1.take_changes()
    # One message read on one chain: the core and that chain are saved, nothing else.
    assert not changed.whole
    assert set(changed.parts) == {"core", chain_part(LINE1, chain_id)}
    assert changed.deleted == frozenset()
    # The sender saves the core, its own copy of the chain and that chain's send times.
    assert set(a1.take_changes().parts) == {
        "core",
        chain_part(LINE1, chain_id),
        sent_part(LINE1, chain_id),
    }
    saved.update(changed.parts)
    b1_device = org.devices["bob"][0]
    restored = DeviceSession.from_parts(
        saved, trust=org.trust, signing=b1_device.signing, box=b1_device.box
    )
    assert restored.to_bytes() == b1.to_bytes()
    assert set(restored.take_changes().parts) == {"core"}  # restored: nothing new
    # The redelivered message is known to the restored session: a duplicate, not a new read.
    assert restored.on_group_message(LINE1, sent.payload).events == []
    # Every reconnect brings the retained key records again: that changes nothing.
    records = {user: org.record(user) for user in org.devices}
    for user, record in records.items():
        restored.on_key_record(user, record)
    assert "records" in restored.take_changes().parts
    for user, record in records.items():
        restored.on_key_record(user, record)
    assert set(restored.take_changes().parts) == {"core"}


def test_retired_own_chains_are_deleted_from_the_saved_parts(net: Net) -> None:
    a1 = net.sessions["a1"]
    a1.take_changes()
    net.broadcast_roster(LINE1, "alice", "bob", expires_at=NOW + 30 * DAY)
    first = None
    for policy in range(MAX_SENT_CHAINS + 1):
        net.send("a1", LINE1, f"chain {policy}")
        if first is None:
            first = decode_id(net.published[-1].payload)[0]
        net.broadcast_roster(LINE1, "alice", "bob", policy=policy + 1, expires_at=NOW + 30 * DAY)
    net.send("a1", LINE1, "one chain too many")
    assert first is not None
    changes = a1.take_changes()
    assert sent_part(LINE1, first) in changes.deleted
    a1.mark_all_changed()
    whole = a1.take_changes()
    assert whole.whole  # the client then drops every other saved part
    assert len([name for name in whole.parts if name.startswith("sent:")]) == MAX_SENT_CHAINS


def test_a_session_saved_in_parts_refuses_missing_or_damaged_parts(net: Net, org: Org) -> None:
    parts = net.sessions["b1"].take_changes().parts
    b1_device = org.devices["bob"][0]

    def restore(changed: dict[str, bytes]) -> DeviceSession:
        return DeviceSession.from_parts(
            changed, trust=org.trust, signing=b1_device.signing, box=b1_device.box
        )

    with pytest.raises(E2EEError, match="no core part"):
        restore({k: v for k, v in parts.items() if k != "core"})
    with pytest.raises(E2EEError, match="corrupt"):
        restore(parts | {"records": b"\xc1"})
    with pytest.raises(E2EEError, match="corrupt"):
        restore(parts | {"rosters": b"\x91\x90"})


def test_a_reader_keeps_the_newest_chains_of_a_sender_and_forgets_older_ones(net: Net) -> None:
    b1 = net.sessions["b1"]
    net.broadcast_roster(LINE1, "alice", "bob", expires_at=NOW + 30 * DAY)
    b1.take_changes()
    sent = []
    for policy in range(MAX_READ_CHAINS + 2):  # each policy change makes alice start a chain
        sent.append(net.send("a1", LINE1, f"chain {policy}"))
        net.broadcast_roster(LINE1, "alice", "bob", policy=policy + 1, expires_at=NOW + 30 * DAY)
    assert net.texts("b1") == [f"chain {n}" for n in range(MAX_READ_CHAINS + 2)]
    changes = b1.take_changes()
    forgotten = [decode_id(item.payload)[0] for item in sent[:2]]
    assert changes.deleted == {chain_part(LINE1, chain_id) for chain_id in forgotten}
    b1.mark_all_changed()
    held = [name for name in b1.take_changes().parts if name.startswith("chain:")]
    assert len(held) == MAX_READ_CHAINS
    # A late copy of a message on a forgotten chain is not read a second time: it says why.
    late = b1.on_group_message(LINE1, sent[0].payload)
    assert [(type(e), getattr(e, "code", None)) for e in late.events] == [
        (Undecryptable, "forgotten")
    ]
    # A replayed distribution cannot bring a forgotten chain back and push out a current one.
    first_copy = next(
        item
        for item in net.published
        if item.topic == "mc/acme/_d/b1"
        and isinstance(envelope := decode(item.payload), Distribution)
        and open_distribution(
            envelope,
            org="acme",
            recipient="b1",
            box_key=net.org.devices["bob"][0].box,
            sender_key=net.org.devices["alice"][0].signing.public,
        ).share.chain_id
        == forgotten[0]
    )
    replay = b1.on_inbox(first_copy.payload)
    assert "forgotten" in refusal(replay.events)
    assert b1.take_changes().deleted == frozenset()
    newest = net.send("a1", LINE1, "still read")
    assert net.texts("b1")[-1] == "still read"
    # The memory of forgotten chains survives a restart from the saved parts.
    b1.mark_all_changed()
    device = net.org.devices["bob"][0]
    restored = DeviceSession.from_parts(
        b1.take_changes().parts, trust=net.org.trust, signing=device.signing, box=device.box
    )
    assert "forgotten" in refusal(restored.on_inbox(first_copy.payload).events)
    assert restored.on_group_message(LINE1, newest.payload).events == []  # read before
