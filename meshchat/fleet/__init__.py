"""Device accounts on the server side: provisioning, revocation, the geofence's telemetry key."""

from meshchat.fleet.provision import (
    DEFAULT_DISPATCH_GROUP,
    DEVICE_KINDS,
    GEOFENCE_TELEMETRY_KEY,
    DeviceAccount,
    ProvisionedDevice,
    add_device,
    device_accounts,
    remove_device,
    telemetry_reader_key,
)
from meshchat.fleet.simulate import DEFAULT_CENTRE, SimulationStats, run_simulation, site_area

__all__ = [
    "DEFAULT_CENTRE",
    "DEFAULT_DISPATCH_GROUP",
    "DEVICE_KINDS",
    "GEOFENCE_TELEMETRY_KEY",
    "DeviceAccount",
    "ProvisionedDevice",
    "SimulationStats",
    "add_device",
    "device_accounts",
    "remove_device",
    "run_simulation",
    "site_area",
    "telemetry_reader_key",
]
