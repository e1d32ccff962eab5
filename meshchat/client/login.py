"""`meshchat login`: make a device on this machine and register it with the directory service.

The device's keys are made here and never leave; the directory service (``_s/dir``) records
their public halves, answers with the org's trust bundle and the device's broker token sealed to
the device's box key, and publishes the user's new key record. The user's password is used for
this one connection only and is not stored.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import secrets
import socket
from pathlib import Path
from typing import Final

import nacl.exceptions
import nacl.public

from meshchat.client._saved import save_groups
from meshchat.client.profile import DeviceProfile
from meshchat.client.store import ClientStore
from meshchat.client.transport import Transport
from meshchat.client.values import TransportState
from meshchat.e2ee import BoxKeyPair, OrgTrust, SigningKeyPair, TrustError
from meshchat.errors import E2EEError, EnvelopeError, MeshchatError, TransportError
from meshchat.rpc import Request, decode_reply
from meshchat.topics import GroupTopic, InboxTopic, ServiceTopic, validate_name

__all__ = ["LoginRefusedError", "default_device_name", "login"]

DIRECTORY: Final = "dir"
_NOT_NAME: Final = re.compile(r"[^a-z0-9-]+")


class LoginRefusedError(MeshchatError):
    """The directory service refused the registration (the message says why)."""


def default_device_name(user: str) -> str:
    """``{user}-{host}``, cut to a valid name: one device per user and machine by default."""
    host = _NOT_NAME.sub("-", socket.gethostname().split(".")[0].lower()).strip("-") or "device"
    return f"{user}-{host}"[:32].rstrip("-")


async def login(
    data: Path,
    *,
    broker: str,
    org: str,
    user: str,
    password: str,
    device: str,
    fingerprint: str | None = None,
    timeout: float = 15.0,  # noqa: ASYNC109  # one deadline over several steps
) -> DeviceProfile:
    """Register a new device of `user` and write its profile under `data`.

    Args:
        data: the data directory (profiles live in ``data/profiles``).
        broker: the broker URL.
        org: the org (topics start with ``mc/{org}/``).
        user: the user name.
        password: the user's password (used for this connection only).
        device: the new device's name.
        fingerprint: the org root's fingerprint, as the admin announced it; checked when given.
        timeout: seconds for the whole exchange.

    Raises:
        AuthenticationError: wrong user name or password.
        LoginRefusedError: the directory service refused (name taken, account revoked, ...).
        TransportError: the broker cannot be reached, or the directory service did not answer.
        TrustError: the org's trust bundle does not match `fingerprint`, or is not for `org`.
    """
    validate_name(org, "org")
    validate_name(user, "user name")
    validate_name(device, "device name")
    signing, box = SigningKeyPair.generate(), BoxKeyPair.generate()
    try:
        async with asyncio.timeout(timeout):
            value = await _register(
                broker,
                org=org,
                user=user,
                password=password,
                device=device,
                signing=signing,
                box=box,
            )
    except TimeoutError as exc:
        raise TransportError(
            f"no answer from the directory service through {broker} within {timeout:.0f} s: "
            "is `meshchat up` running there?",
            reason="timeout",
        ) from exc
    trust, token, groups = _open_reply(value, box, org, fingerprint)
    profile = DeviceProfile.create(
        data,
        org=org,
        user=user,
        device=device,
        broker=broker,
        trust=trust,
        signing=signing,
        box=box,
        token=token,
    )
    with ClientStore(profile.store_path) as store:
        save_groups(store, groups)
    # Open the device's persistent session now, so its inbox keeps what is sent from here on.
    async with asyncio.timeout(timeout):
        async with Transport(
            broker, client_id=device, username=user, password=token, clean_session=False
        ) as transport:
            await transport.subscribe(InboxTopic(org, device).topic)
            for path in sorted(groups):
                dept, name = path.split("/", 1)
                group = GroupTopic(org, dept, name)
                await transport.subscribe(group.roster.topic)
                await transport.subscribe(group.topic)
    return profile


async def _register(
    broker: str,
    *,
    org: str,
    user: str,
    password: str,
    device: str,
    signing: SigningKeyPair,
    box: BoxKeyPair,
) -> object:
    request = Request("register", (device, signing.public, box.public))
    reply_topic = ServiceTopic(org, DIRECTORY, user, reply=True).topic
    async with Transport(
        broker,
        client_id=f"{user}.login-{secrets.token_hex(4)}",
        username=user,
        password=password,
        clean_session=True,
    ) as transport:
        if transport.state is not TransportState.CONNECTED:
            change = await transport.wait_state(TransportState.CONNECTED, TransportState.CLOSED)
            if change.state is TransportState.CLOSED:
                raise TransportError(f"cannot reach the broker at {broker}", reason="closed")
        await transport.subscribe(reply_topic)
        await transport.publish(ServiceTopic(org, DIRECTORY, user).topic, request.encode())
        async for message in transport.messages():
            if message.topic != reply_topic:
                continue
            try:
                reply = decode_reply(message.payload)
            except EnvelopeError:
                continue
            if not hmac.compare_digest(reply.id, request.id):
                continue
            if not reply.ok:
                raise LoginRefusedError(f"the directory refused the login: {reply.value}")
            return reply.value
    raise TransportError(
        f"the link to {broker} closed before the directory answered", reason="closed"
    )


def _open_reply(
    value: object, box: BoxKeyPair, org: str, fingerprint: str | None
) -> tuple[OrgTrust, str, list[str]]:
    match value:
        case [bytes(bundle), bytes(sealed), list(groups)]:
            pass
        case _:
            raise LoginRefusedError("the directory's answer to the login is malformed")
    try:
        trust = OrgTrust.decode(bundle)
        token = nacl.public.SealedBox(nacl.public.PrivateKey(box.secret)).decrypt(sealed)
    except (EnvelopeError, E2EEError, nacl.exceptions.CryptoError) as exc:
        raise TrustError(f"the directory's answer does not verify: {exc}") from exc
    if trust.org != org:
        raise TrustError(f"the broker speaks for org {trust.org!r}, not {org!r}")
    if fingerprint is not None and not hmac.compare_digest(
        fingerprint.strip().lower(), trust.fingerprint
    ):
        raise TrustError(
            f"the org root's fingerprint is {trust.fingerprint}, not {fingerprint}: "
            "someone may be impersonating the server; do not log in"
        )
    return trust, token.decode("utf-8"), [str(g) for g in groups]
