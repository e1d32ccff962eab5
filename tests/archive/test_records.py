"""What the archiver keeps of a message: header columns from the clear parts, or a refusal."""

from __future__ import annotations

import os

import pytest

from meshchat.archive import Rejected, RejectReason, TopicKind, classify
from meshchat.envelope import MAX_ENVELOPE_LEN, EnvelopeType, Signed, Telemetry, encode
from tests.archive.helpers import LINE1, ORG, copy, message, sealed


def test_a_group_message_keeps_group_chain_index_size_and_digest() -> None:
    payload = message(7, 42)
    record = classify(LINE1, payload, org=ORG, received_at=1000.5)
    assert (record.kind, record.group_path, record.etype) == (
        TopicKind.GROUP,
        "ops/line1",
        EnvelopeType.GROUP,
    )
    assert (record.chain_id, record.chain_index, record.sender) == (7, 42, None)
    assert (record.received_at, record.size, record.payload) == (1000.5, len(payload), payload)
    assert len(record.digest) == 32


def test_a_compliance_copy_names_its_chain_and_sender_and_must_name_its_own_group() -> None:
    record = classify(LINE1, copy("ops/line1", 9, 3, sender="a2"), org=ORG, received_at=0)
    assert (record.etype, record.chain_id, record.chain_index, record.sender) == (
        EnvelopeType.DIST,
        9,
        3,
        "a2",
    )
    with pytest.raises(Rejected, match="names another group") as other:
        classify(LINE1, copy("ops/line2", 9), org=ORG, received_at=0)
    assert other.value.reason is RejectReason.MALFORMED


def test_key_records_and_inboxes_are_kept_by_user_and_device() -> None:
    signed = encode(Signed("bob", b"record", os.urandom(64)))
    key = classify(f"mc/{ORG}/_k/bob", signed, org=ORG, received_at=0)
    assert (key.kind, key.name, key.group_path, key.sender) == (TopicKind.KEY, "bob", None, "bob")
    inbox = classify(f"mc/{ORG}/_d/b1", sealed("a1"), org=ORG, received_at=0)
    assert (inbox.kind, inbox.name, inbox.etype, inbox.sender) == (
        TopicKind.INBOX,
        "b1",
        EnvelopeType.SEALED,
        "a1",
    )
    dist = classify(f"mc/{ORG}/_d/b1", copy("ops/line1", 5), org=ORG, received_at=0)
    assert (dist.etype, dist.chain_id) == (EnvelopeType.DIST, 5)


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        (f"mc/{ORG}/_p/b1", b"\x01online"),  # presence
        (f"mc/{ORG}/_t/b1/gps", b"{}"),  # telemetry (5 levels)
        (f"mc/{ORG}/ops/line1/_r", b"roster"),  # a roster
        ("mc/other/ops/line1", b"x"),  # another org
        (f"mc/{ORG}/_s/dir", b"x"),  # a service level
        (f"mc/{ORG}/_k/bob", b""),  # a cleared retained key record
        ("owntracks/bob/phone", b"{}"),
    ],
)
def test_what_is_not_archived_is_ignored_not_counted_as_bad(topic: str, payload: bytes) -> None:
    with pytest.raises(Rejected) as rejected:
        classify(topic, payload, org=ORG, received_at=0)
    assert rejected.value.reason is RejectReason.IGNORED


@pytest.mark.parametrize(
    ("topic", "payload", "says"),
    [
        (LINE1, b"", "empty"),
        (LINE1, b"\x01\xff\xfe", "not valid msgpack"),
        (LINE1, message(1, 1) + b"x", "not valid msgpack"),
        (LINE1, b"\x07" + message(1, 1)[1:], "version 7"),
        (LINE1, sealed(), "does not belong on group topic"),
        (LINE1, encode(Telemetry(1, 1, b"\x00" * 17)), "telemetry envelope does not belong"),
        (f"mc/{ORG}/_k/bob", message(1, 1), "does not belong on key topic"),
        (f"mc/{ORG}/_d/b1", message(1, 1), "does not belong on inbox topic"),
        (LINE1, b"\x01" + b"\x00" * MAX_ENVELOPE_LEN, "over the envelope limit"),
    ],
    # Stable ids (the payloads hold random bytes): what the test expects, not the payload.
    ids=lambda value: f"{len(value)}B" if isinstance(value, bytes) else str(value),
)
def test_malformed_wrong_type_and_oversize_envelopes_are_refused(
    topic: str, payload: bytes, says: str
) -> None:
    with pytest.raises(Rejected, match=says) as rejected:
        classify(topic, payload, org=ORG, received_at=0)
    assert rejected.value.reason is RejectReason.MALFORMED
    if payload:  # the message never quotes the payload
        assert payload[:16].hex() not in str(rejected.value)
