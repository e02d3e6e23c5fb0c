"""What the bridge does with one message from the MQTT inbox, as a plain function."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from gateway.errors import InputError
from gateway.messages import Heartbeat, Rejection, Source, StatusReport, utcnow
from gateway.payload import parse_payload
from gateway.topics import TopicKind, mqtt_topic, parse_routing_key


@dataclass(frozen=True)
class Forward:
    message: Heartbeat | StatusReport


@dataclass(frozen=True)
class Reject:
    rejection: Rejection


@dataclass(frozen=True)
class Ignore:
    """Traffic that is not device input, such as the gateway's own commands to devices."""

    why: str


Outcome = Forward | Reject | Ignore


def convert(routing_key: str, body: bytes, received_at: datetime | None = None) -> Outcome:
    """Turn an MQTT publish (as RabbitMQ delivers it) into a canonical message or a dead letter."""
    received_at = received_at or utcnow()
    device_id = None
    try:
        topic = parse_routing_key(routing_key)
        device_id = topic.device_id
        match topic.kind:
            case TopicKind.HEARTBEAT:
                return Forward(
                    Heartbeat.from_payload(device_id, parse_payload(body), Source.MQTT, received_at)
                )
            case TopicKind.STATUS:
                return Forward(StatusReport.from_payload(device_id, body, Source.MQTT, received_at))
            case TopicKind.COMMANDS:
                return Ignore(f"commands for {device_id} go to the device, not to the gateway")
    except InputError as error:
        return Reject(
            Rejection.of(
                error,
                body,
                Source.MQTT,
                device_id=device_id,
                topic=mqtt_topic(routing_key),
                received_at=received_at,
            )
        )
    raise AssertionError(f"unhandled topic kind in {routing_key!r}")
