"""What a device may do on the broker: the rules behind the endpoints RabbitMQ calls.

A device (MQTT username = device id) may use the MQTT vhost, write `devices.<its id>.*` and
read `devices.<its id>.commands` on `amq.topic`, and use only its own subscription queue (so
it must connect with client id = device id to subscribe). Everything else is denied.
"""

from __future__ import annotations

from gateway.topology import MQTT_EXCHANGE

MQTT_VHOST = "/"


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
    if any(part in ("*", "#") or not part for part in parts):
        return False
    if permission == "write":
        return True
    return permission == "read" and parts[2] == "commands"
