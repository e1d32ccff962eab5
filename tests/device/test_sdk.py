"""The device SDK (paho, in its own thread) against a real site server and real clients."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from paho.mqtt.enums import CallbackAPIVersion, _ConnectionState

from meshchat.client import Client, Message, Transport
from meshchat.client.dispatch import LedgerOrder
from meshchat.client.fleet import Fleet as FleetView
from meshchat.device import Device, GpsFix, Order, OrderState, decode_fix, open_key_share
from meshchat.device.sdk import _JitteredClient, next_backoff
from meshchat.directory.policy import GEOFENCE_SERVICE, SERVICE_PREFIX
from meshchat.e2ee import Kind
from meshchat.errors import AuthenticationError, NotFoundError, OrderError, TelemetryError
from meshchat.fleet import remove_device, telemetry_reader_key
from tests.device.conftest import Fleet
from tests.proxy import TcpProxy

WAIT = 20.0


@asynccontextmanager
async def running(device: Device) -> AsyncIterator[Device]:
    """The device connected in its own thread, closed at the end (off the event loop)."""
    await asyncio.to_thread(device.__enter__)
    try:
        yield device
    finally:
        await asyncio.to_thread(device.close)


async def until(view: FleetView, check: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        await view.wait_until(check)


async def test_status_and_fixes_reach_the_dispatch_group_and_no_one_else(fleet: Fleet) -> None:
    made = await fleet.add_device("van-1")
    fleet.directory.add_members("root", made.group, ["bob"])
    bob_profile = await fleet.login("bob")
    carol_profile = await fleet.login("carol")  # same department, not in ops/dispatch
    async with Client(bob_profile) as bob, Client(carol_profile) as carol:
        await bob.watch_devices(["van-1"])
        await carol.watch_devices(["van-1"])
        async with running(Device(made.path, broker=fleet.url)) as van:
            van.publish_status(battery=87, temperature=21.5, state="door-open-7f3a")
            van.publish_fix(lat=52.52, lon=13.405, accuracy=8, speed=12.5, heading=270)
            await until(bob.fleet, lambda: bob.fleet.fix("van-1") is not None)
            await until(bob.fleet, lambda: bob.fleet.status("van-1") is not None)
            await until(carol.fleet, lambda: carol.fleet.waiting("van-1") >= 2)
    status = bob.fleet.status("van-1")
    assert status is not None
    assert (status.battery, status.temperature, status.state) == (87, 21.5, "door-open-7f3a")
    fix = bob.fleet.fix("van-1")
    assert fix is not None
    assert (fix.lat, fix.lon, fix.accuracy, fix.speed, fix.heading) == (
        52.52,
        13.405,
        8.0,
        12.5,
        270.0,
    )
    assert carol.fleet.status("van-1") is None  # the ciphertext reached her; no key did
    assert not carol.fleet.has_key("van-1")
    for stored in ("broker.db", "archive.db"):
        assert b"door-open-7f3a" not in (fleet.data / stored).read_bytes()


async def test_a_dispatcher_added_later_reads_the_retained_status(fleet: Fleet) -> None:
    made = await fleet.add_device("van-1")
    async with running(Device(made.path, broker=fleet.url)) as van:
        van.publish_status(battery=64, state="parked")
        await asyncio.to_thread(van.flush, WAIT)
        fleet.directory.add_members("root", made.group, ["dave"])
        dave_profile = await fleet.login("dave")
        async with Client(dave_profile) as dave:
            await dave.watch_devices(["van-1"])
            await until(dave.fleet, lambda: dave.fleet.status("van-1") is not None)
            status = dave.fleet.status("van-1")
            assert status is not None
            assert (status.battery, status.state) == (64, "parked")
            assert dave.fleet.presence("van-1") is True


async def test_the_geofence_worker_can_read_fixes_with_its_own_key(fleet: Fleet) -> None:
    made = await fleet.add_device("van-1")
    reader = telemetry_reader_key(fleet.data)
    assert reader is not None
    token = fleet.server._service_tokens[GEOFENCE_SERVICE]
    name = f"{SERVICE_PREFIX}{GEOFENCE_SERVICE}"
    async with Transport(
        fleet.url, client_id=f"{name}.test", username=name, password=token, clean_session=True
    ) as geofence:
        await geofence.subscribe("mc/acme/_s/geofence/+")
        await geofence.subscribe("mc/acme/_t/+/gps")
        async with running(Device(made.path, broker=fleet.url)) as van:
            van.publish_fix(lat=48.1374, lon=11.5755, accuracy=5)
            signing = {d.name: d.signing_public for d in fleet.directory.devices()}
            key = None
            async with asyncio.timeout(WAIT):
                async for message in geofence.messages():
                    if message.topic == "mc/acme/_s/geofence/van-1":
                        sender, key = open_key_share(
                            message.payload, reader=reader, signing_key=signing.get
                        )
                        assert sender == "van-1"
                    elif message.topic == "mc/acme/_t/van-1/gps":
                        assert key is not None  # the share is published first
                        fix = decode_fix(message.payload, topic=message.topic, key=key)
                        break
    assert (fix.lat, fix.lon, fix.accuracy) == (48.1374, 11.5755, 5.0)


async def test_a_bad_field_is_refused_on_the_device_and_nothing_is_sent(fleet: Fleet) -> None:
    made = await fleet.add_device("van-1")
    async with running(Device(made.path, broker=fleet.url)) as van:
        counter = van.core.sealer.counter
        with pytest.raises(TelemetryError, match=r"battery 150 is outside 0\.\.100") as caught:
            van.publish_status(battery=150)
        assert caught.value.field == "battery"
        with pytest.raises(TelemetryError, match="lat"):
            van.publish_fix(GpsFix(1_800_000_000, 123.0, 0.0))
        assert van.core.sealer.counter == counter


async def test_killing_the_device_process_marks_it_offline(fleet: Fleet, tmp_path: Path) -> None:
    made = await fleet.add_device("van-1")
    fleet.directory.add_members("root", made.group, ["bob"])
    script = (
        "import sys, threading\n"
        "from meshchat.device import Device\n"
        "with Device(sys.argv[1], broker=sys.argv[2]) as device:\n"
        "    device.publish_status(battery=50)\n"
        "    print('ready', flush=True)\n"
        "    threading.Event().wait()\n"
    )
    async with Client(await fleet.login("bob")) as bob:
        await bob.watch_devices(["van-1"])
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            str(made.path),
            fleet.url,
            stdout=asyncio.subprocess.PIPE,
            cwd=tmp_path,
        )
        try:
            assert process.stdout is not None
            async with asyncio.timeout(WAIT):
                assert await process.stdout.readline() == b"ready\n"
            await until(bob.fleet, lambda: bob.fleet.presence("van-1") is True)
        finally:
            process.kill()
            await process.wait()
        await until(bob.fleet, lambda: bob.fleet.presence("van-1") is False)


async def test_a_silent_link_marks_the_device_offline_after_its_keepalive(fleet: Fleet) -> None:
    made = await fleet.add_device("van-1")
    fleet.directory.add_members("root", made.group, ["bob"])
    port = fleet.server.broker.listener("mqtt").port
    async with TcpProxy("127.0.0.1", port) as proxy, Client(await fleet.login("bob")) as bob:
        await bob.watch_devices(["van-1"])
        async with running(Device(made.path, broker=proxy.url, keepalive=1)):
            await until(bob.fleet, lambda: bob.fleet.presence("van-1") is True)
            proxy.stall()  # nothing closes: only the broker's keepalive check notices
            await until(bob.fleet, lambda: bob.fleet.presence("van-1") is False)
            proxy.resume()


async def test_a_clean_close_says_offline(fleet: Fleet) -> None:
    made = await fleet.add_device("van-1")
    fleet.directory.add_members("root", made.group, ["bob"])
    async with Client(await fleet.login("bob")) as bob:
        await bob.watch_devices(["van-1"])
        async with running(Device(made.path, broker=fleet.url)):
            await until(bob.fleet, lambda: bob.fleet.presence("van-1") is True)
        await until(bob.fleet, lambda: bob.fleet.presence("van-1") is False)


async def test_a_revoked_device_cannot_connect(fleet: Fleet) -> None:
    made = await fleet.add_device("van-1")
    assert remove_device(fleet.directory, actor="root", name="van-1") == ["ops/dispatch"]
    watcher = fleet.server.watcher
    assert watcher is not None
    await watcher.reload()
    device = Device(made.path, broker=fleet.url)
    with pytest.raises(AuthenticationError, match="refused device van-1"):
        await asyncio.to_thread(device.__enter__)
    assert not device.online


async def test_the_device_keeps_its_state_between_runs(fleet: Fleet) -> None:
    made = await fleet.add_device("van-1")
    fleet.directory.add_members("root", made.group, ["bob"])
    await fleet.login("bob")
    async with running(Device(made.path, broker=fleet.url)) as van:
        assert await asyncio.to_thread(van.wait_readers, ["bob-laptop"], WAIT)
        first_key = van.core.sealer.key.key_id
    state = made.path.with_name(made.path.name + ".state")
    assert state.stat().st_mode & 0o777 == 0o600
    again = Device(made.path, broker=fleet.url)
    # Rosters and key records come back from the state file: readers are known before any
    # retained message arrives, and the restart made a new telemetry key.
    assert again.core.readers().keys() == {"bob-laptop"}
    assert again.core.sealer.key.key_id != first_key


async def wait_state(client: Client, order_id: str, state: OrderState) -> LedgerOrder:
    async with asyncio.timeout(WAIT):
        return await client.wait_order(order_id, lambda order: order.state is state)


async def test_an_order_sent_while_offline_arrives_once_and_its_answers_reach_the_sender(
    fleet: Fleet,
) -> None:
    made = await fleet.add_device("van-1")
    fleet.directory.add_members("root", made.group, ["bob"])
    bob_profile = await fleet.login("bob")
    async with running(Device(made.path, broker=fleet.url)):
        pass  # the device has a persistent session at the broker from now on
    async with Client(bob_profile) as bob:
        sent = await bob.send_order("van-1", "pick up 12 pallets at gate 4")
        async with asyncio.timeout(WAIT):
            await bob.flush()  # the broker holds it for the device, which is offline
        assert sent.state is OrderState.SENT
        orders: list[Order] = []
        arrived = threading.Event()

        def on_order(order: Order) -> None:
            orders.append(order)
            order.accept()
            arrived.set()

        async with running(Device(made.path, broker=fleet.url, on_order=on_order)) as van:
            assert await asyncio.to_thread(arrived.wait, WAIT)
            accepted = await wait_state(bob, sent.order_id, OrderState.ACCEPTED)
            assert accepted.accepted_at is not None
            van.answer(sent.order_id, "done")
            done = await wait_state(bob, sent.order_id, OrderState.DONE)
            assert done.done_at is not None
            assert van.orders == []
        (order,) = orders
        assert (order.order_id, order.text, order.sender) == (
            sent.order_id,
            "pick up 12 pallets at gate 4",
            "bob",
        )
        again: list[Order] = []
        async with running(Device(made.path, broker=fleet.url, on_order=again.append)) as van:
            assert await asyncio.to_thread(van.wait_synced, WAIT)
        assert again == []  # answered, acknowledged: never handed over twice
        assert [o.order_id for o in bob.dispatch.orders(open_only=True)] == []


async def test_an_order_sent_before_the_device_ever_connected_arrives_on_its_first_run(
    fleet: Fleet,
) -> None:
    made = await fleet.add_device("van-1")
    fleet.directory.add_members("root", made.group, ["bob"])
    bob_profile = await fleet.login("bob")
    async with Client(bob_profile) as bob:
        # The broker holds no session for the van yet: only the archiver keeps this.
        sent = await bob.send_order("van-1", "collect the spare tyre at depot 2")
        async with asyncio.timeout(WAIT):
            await bob.flush()
        orders: list[Order] = []
        arrived = threading.Event()

        def on_order(order: Order) -> None:
            orders.append(order)
            order.accept()
            arrived.set()

        # A program that starts, reports and ends at once (the README's example): the device
        # reads its archived inbox while starting, and its answer goes out before it closes.
        async with running(Device(made.path, broker=fleet.url, on_order=on_order)):
            pass
        assert arrived.is_set()
        await wait_state(bob, sent.order_id, OrderState.ACCEPTED)
        assert [(o.order_id, o.text) for o in orders] == [
            (sent.order_id, "collect the spare tyre at depot 2")
        ]
        again: list[Order] = []
        async with running(Device(made.path, broker=fleet.url, on_order=again.append)) as van:
            assert await asyncio.to_thread(van.wait_synced, WAIT)
        assert again == []  # read from the archive once, not on every start


async def test_an_unanswered_order_is_handed_over_again_after_a_crash(fleet: Fleet) -> None:
    made = await fleet.add_device("van-1")
    fleet.directory.add_members("root", made.group, ["bob"])
    async with Client(await fleet.login("bob")) as bob:
        arrived = threading.Event()
        async with running(
            Device(made.path, broker=fleet.url, on_order=lambda _order: arrived.set())
        ):
            sent = await bob.send_order("van-1", "check the reefer unit")
            assert await asyncio.to_thread(arrived.wait, WAIT)
        handed: list[Order] = []
        device = Device(made.path, broker=fleet.url, on_order=handed.append)
        assert [o.order_id for o in device.orders] == [sent.order_id]
        async with running(device):
            assert [o.order_id for o in handed] == [sent.order_id]
            handed[0].reject("reefer unit is not on this van")
            rejected = await wait_state(bob, sent.order_id, OrderState.REJECTED)
            with pytest.raises(OrderError, match="is rejected"):
                handed[0].done()
        assert rejected.reason == "reefer unit is not on this van"


async def test_an_order_to_a_persons_device_is_answered_from_their_client(fleet: Fleet) -> None:
    bob_profile = await fleet.login("bob")
    carol_profile = await fleet.login("carol")
    async with Client(carol_profile) as carol, Client(bob_profile) as bob:
        sent = await bob.send_order("carol-laptop", "count the returns in bay 2")
        async with asyncio.timeout(WAIT):
            received = await carol.wait_order(sent.order_id, lambda _order: True)
        assert (received.direction, received.user, received.text) == (
            "in",
            "bob",
            "count the returns in bay 2",
        )
        await carol.answer_order(sent.order_id, OrderState.DONE)
        done = await wait_state(bob, sent.order_id, OrderState.DONE)
        assert done.device == "carol-laptop"
        with pytest.raises(OrderError, match="was sent to bob"):
            await bob.answer_order(sent.order_id, OrderState.DONE)


async def test_an_order_to_an_unknown_device_is_refused_at_once(fleet: Fleet) -> None:
    async with Client(await fleet.login("bob"), ready_timeout=0.5) as bob:
        with pytest.raises(NotFoundError, match="no device 'van-9' is known"):
            await bob.send_order("van-9", "anything")


class Clock:
    """A device clock the test moves: 100 alerts in one minute without waiting a minute."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_an_alert_storm_is_one_message_with_a_count(fleet: Fleet) -> None:
    made = await fleet.add_device("van-1")
    fleet.directory.add_members("root", made.group, ["bob"])
    async with Client(await fleet.login("bob")) as bob:
        assert "ops/dispatch" in bob.groups
        clock = Clock()
        async with running(Device(made.path, broker=fleet.url, clock=clock)) as van:
            for _ in range(100):  # battery below 15%, 100 times in a minute
                clock.now += 0.6
                van.publish_status(battery=9)
        async with asyncio.timeout(WAIT):
            async for event in bob.events():
                if (
                    isinstance(event, Message)
                    and event.kind is Kind.EDIT
                    and " x100, " in event.text
                ):
                    break
        (alert,) = bob.store.history("mc/acme/ops/dispatch")
        assert alert.sender == "van-1"
        assert alert.body.startswith("ALERT van-1: battery 9% (rule: battery < 15) x100, last ")
        assert alert.edited_at is not None


def test_reconnect_waits_double_up_to_the_cap_and_are_spread_out() -> None:
    nominal: float | None = None
    nominals = []
    for _ in range(8):
        nominal, wait = next_backoff(nominal, 1, 60)
        nominals.append(nominal)
        assert nominal / 2 <= wait <= nominal
    assert nominals == [1, 2, 4, 8, 16, 32, 60, 60]
    # A fleet that lost the broker together does not come back together.
    first_waits = {round(next_backoff(None, 2, 60)[1], 3) for _ in range(100)}
    assert len(first_waits) > 50
    assert min(first_waits) >= 1.0
    assert max(first_waits) <= 2.0


def test_paho_takes_its_reconnect_wait_from_the_jittered_client() -> None:
    device_client = _JitteredClient(CallbackAPIVersion.VERSION2, client_id="van-1")
    device_client.reconnect_delay_set(1, 60)
    device_client._state = _ConnectionState.MQTT_CS_DISCONNECTED  # wait returns
    waits = []
    for _ in range(4):
        device_client._reconnect_wait()  # what paho's loop calls between attempts
        waits.append(device_client._reconnect_delay)
    assert all(wait is not None for wait in waits)
    assert [w for w in waits if w is not None] != [1, 2, 4, 8]  # jittered, not paho's own
    for wait, nominal in zip(waits, [1, 2, 4, 8], strict=True):
        assert wait is not None
        assert nominal / 2 <= wait <= nominal
