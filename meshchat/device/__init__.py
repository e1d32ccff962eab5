"""The device SDK: status, GPS fixes and presence from small Linux devices, over paho-mqtt.

Importing it loads neither amqtt, Textual, sqlite-utils nor the async client (an import-linter
contract checks that): only paho-mqtt, msgpack, PyNaCl and meshchat's sans-IO core.

```python
from meshchat.device import Device, Order


def on_order(order: Order) -> None:  # once per work order, on the SDK's thread
    order.accept()


with Device("van-1.json", on_order=on_order) as van:  # `meshchat device add` wrote the file
    van.publish_status(battery=87, temperature=21.5, state="ok")
    van.publish_fix(lat=52.5200, lon=13.4050, accuracy=8, speed=12.5, heading=270)
```
"""

from meshchat.device.alerts import (
    DEFAULT_RULES,
    Alerter,
    AlertPost,
    AlertRule,
    NewAlert,
    UpdateAlert,
    parse_rules,
)
from meshchat.device.core import OFFLINE, ONLINE, DeviceCore, Output, Publication, WorkOrder
from meshchat.device.credentials import CREDENTIALS_FORMAT, DeviceCredentials
from meshchat.device.orders import (
    ANSWERS,
    MAX_ORDER_TEXT,
    MAX_REASON,
    OrderState,
    StateChange,
    may_move,
    new_order_id,
    order_inner,
    parse_order,
    parse_state,
    state_inner,
)
from meshchat.device.sdk import DEFAULT_KEEPALIVE, Device, Order, OrderHandler
from meshchat.device.simulate import EARTH_RADIUS_M, SimulatedVehicle, move
from meshchat.device.telemetry import (
    GEOFENCE_READER,
    MAX_EXTRA,
    MAX_STATE_LEN,
    ExtraValue,
    GpsFix,
    Report,
    Status,
    decode_fix,
    decode_gps,
    decode_status,
    encode_gps,
    encode_status,
    geofence_share_topic,
    is_key_request,
    key_from_inner,
    key_request_inner,
    key_share_inner,
    open_key_share,
    read_report,
    seal_key_request,
    seal_key_share,
)

__all__ = [
    "ANSWERS",
    "CREDENTIALS_FORMAT",
    "DEFAULT_KEEPALIVE",
    "DEFAULT_RULES",
    "EARTH_RADIUS_M",
    "GEOFENCE_READER",
    "MAX_EXTRA",
    "MAX_ORDER_TEXT",
    "MAX_REASON",
    "MAX_STATE_LEN",
    "OFFLINE",
    "ONLINE",
    "AlertPost",
    "AlertRule",
    "Alerter",
    "Device",
    "DeviceCore",
    "DeviceCredentials",
    "ExtraValue",
    "GpsFix",
    "NewAlert",
    "Order",
    "OrderHandler",
    "OrderState",
    "Output",
    "Publication",
    "Report",
    "SimulatedVehicle",
    "StateChange",
    "Status",
    "UpdateAlert",
    "WorkOrder",
    "decode_fix",
    "decode_gps",
    "decode_status",
    "encode_gps",
    "encode_status",
    "geofence_share_topic",
    "is_key_request",
    "key_from_inner",
    "key_request_inner",
    "key_share_inner",
    "may_move",
    "move",
    "new_order_id",
    "open_key_share",
    "order_inner",
    "parse_order",
    "parse_rules",
    "parse_state",
    "read_report",
    "seal_key_request",
    "seal_key_share",
    "state_inner",
]
