"""What a device may do on the broker: the rules behind the endpoints RabbitMQ calls.

A device (MQTT username = device id, password = its token) connects with client id = its
device id, and only over MQTT (RabbitMQ names the MQTT client id in every check it asks about;
an AMQP login names none, and is refused). That one rule means no device can take over another
device's session: MQTT lets a new connection with a client id in use close the old one, and
only the device itself may use its id.

Once in, a device may write `devices.<its id>.heartbeat`, `.status` and `.replies` on
`amq.topic` (MQTT topics `devices/<id>/...`), read `devices.<its id>.commands`, and use only
its own subscription queue. Everything else is denied.
"""

from __future__ import annotations

from gateway.amqp.topology import MQTT_EXCHANGE
from gateway.contract.topics import TopicKind

MQTT_VHOST = "/"
#: What a device may publish to and subscribe to, under `devices/<its id>/`.
DEVICE_PUBLISHES = frozenset({TopicKind.HEARTBEAT, TopicKind.STATUS, TopicKind.REPLIES})
DEVICE_READS = frozenset({TopicKind.COMMANDS})


def own_session(device_id: str, client_id: str) -> bool:
    """An MQTT session of the device itself: its client id is its device id."""
    return bool(device_id) and client_id == device_id


def vhost_allowed(device_id: str, vhost: str) -> bool:
    return vhost == MQTT_VHOST


def resource_allowed(device_id: str, resource: str, name: str, permission: str) -> bool:
    if resource == "exchange":
        return name == MQTT_EXCHANGE and permission in ("read", "write")
    if resource == "queue":
        # RabbitMQ 3.10 names a client's subscription queue after its MQTT client id.
        own = {f"mqtt-subscription-{device_id}qos0", f"mqtt-subscription-{device_id}qos1"}
        return name in own and permission in ("configure", "read", "write")
    return False


def topic_allowed(device_id: str, name: str, permission: str, routing_key: str) -> bool:
    """Topic authorization on `amq.topic` (routing keys use `.` where MQTT uses `/`)."""
    if name != MQTT_EXCHANGE:
        return False
    parts = routing_key.split(".")
    if len(parts) != 3 or parts[0] != "devices" or parts[1] != device_id:
        return False
    allowed = {"write": DEVICE_PUBLISHES, "read": DEVICE_READS}.get(permission, frozenset())
    return parts[2] in allowed
