"""Topic grammar: `devices/{device_id}/{heartbeat|status|commands|replies}`.

RabbitMQ's MQTT plugin publishes to `amq.topic` with `/` mapped to `.` (and `.` to `/`), so the
bridge sees routing keys such as `devices.sensor-1.heartbeat`; both spellings parse here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from pydantic import StringConstraints

from gateway.contract.reasons import InputError, Reason

DEVICE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN[1:-1])
DEVICE_ID_RULE = "1-64 characters of A-Z, a-z, 0-9, '_' and '-'"

DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]

_MQTT_TO_AMQP = str.maketrans({"/": ".", ".": "/"})


class TopicKind(StrEnum):
    HEARTBEAT = "heartbeat"
    STATUS = "status"
    COMMANDS = "commands"
    REPLIES = "replies"


@dataclass(frozen=True)
class Topic:
    device_id: str
    kind: TopicKind

    @property
    def mqtt(self) -> str:
        return f"devices/{self.device_id}/{self.kind}"

    @property
    def routing_key(self) -> str:
        return f"devices.{self.device_id}.{self.kind}"


def mqtt_topic(routing_key: str) -> str:
    """The MQTT topic a device published to, from the routing key RabbitMQ gave it."""
    return routing_key.translate(_MQTT_TO_AMQP)


def validate_device_id(device_id: str) -> str:
    if not DEVICE_ID_RE.fullmatch(device_id):
        shown = device_id if len(device_id) <= 80 else device_id[:77] + "..."
        raise InputError(
            Reason.INVALID_DEVICE_ID, f"device id {shown!r} is invalid: use {DEVICE_ID_RULE}"
        )
    return device_id


def claimed_device(routing_key: str) -> str | None:
    """The device a routing key names in its second level, if that is a valid device id,
    whatever the rest: the broker lets a device publish only under its own id, so a topic
    that does not parse still tells whose dead letter it is."""
    parts = mqtt_topic(routing_key).split("/", 2)
    if len(parts) > 1 and parts[0] == "devices" and DEVICE_ID_RE.fullmatch(parts[1]):
        return parts[1]
    return None


def parse_routing_key(routing_key: str) -> Topic:
    """Parse an `amq.topic` routing key published by the MQTT plugin."""
    return parse_mqtt_topic(mqtt_topic(routing_key))


def parse_mqtt_topic(topic: str) -> Topic:
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "devices":
        raise InputError(
            Reason.UNKNOWN_TOPIC,
            f"topic {_shorten(topic)!r} is not devices/<device_id>/"
            f"{'|'.join(k.value for k in TopicKind)}",
        )
    _, device_id, kind = parts
    validate_device_id(device_id)
    try:
        return Topic(device_id, TopicKind(kind))
    except ValueError:
        raise InputError(
            Reason.UNKNOWN_TOPIC,
            f"unknown topic {_shorten(topic)!r}: expected devices/{device_id}/"
            f"{'|'.join(k.value for k in TopicKind)}",
        ) from None


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
