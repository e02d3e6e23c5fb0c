"""What the bridge does with one message from the MQTT inbox, as a plain function; and the
conversion of a heartbeat body that the api shares with it.

Both are total: they return a canonical message or a rejection, and never raise. An exception
nobody foresaw becomes a rejection too (reason `unexpected_error`): a message that failed once
would fail again, so requeueing it would only block the messages behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from gateway.contract.commands import CommandReply, parse_reply
from gateway.contract.messages import Heartbeat, Rejection, Source, StatusReport, utcnow
from gateway.contract.payload import parse_payload
from gateway.contract.reasons import InputError, unforeseen
from gateway.contract.topics import TopicKind, claimed_device, mqtt_topic, parse_routing_key


@dataclass(frozen=True)
class Forward:
    message: Heartbeat | StatusReport


@dataclass(frozen=True)
class Reject:
    rejection: Rejection


@dataclass(frozen=True)
class ForwardReply:
    """A device's reply to a command, for the worker (on `gateway.replies`)."""

    reply: CommandReply


@dataclass(frozen=True)
class Ignore:
    """Traffic that is not device input, such as the gateway's own commands to devices."""

    why: str


Outcome = Forward | ForwardReply | Reject | Ignore


def convert(routing_key: str, body: bytes, received_at: datetime | None = None) -> Outcome:
    """Turn an MQTT publish (as RabbitMQ delivers it) into a canonical message or a dead letter.
    Never raises."""
    received_at = received_at or utcnow()
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
            case TopicKind.REPLIES:
                return ForwardReply(parse_reply(device_id, body, Source.MQTT, received_at))
            case TopicKind.COMMANDS:
                return Ignore(f"commands for {device_id} go to the device, not to the gateway")
        raise AssertionError(f"unhandled topic kind {topic.kind!r}")
    except InputError as refused:
        error = refused
    except Exception as exc:
        error = unforeseen(exc, "an MQTT message")
    return Reject(
        Rejection.of(
            error,
            body,
            Source.MQTT,
            device_id=claimed_device(routing_key),
            topic=mqtt_topic(routing_key),
            received_at=received_at,
        )
    )


def heartbeat_from(
    device_id: str, body: bytes, source: Source, received_at: datetime | None = None
) -> Heartbeat:
    """The heartbeat a body (of a known, valid device) is. Raises `InputError` and nothing
    else: an exception nobody foresaw becomes one too."""
    try:
        return Heartbeat.from_payload(device_id, parse_payload(body), source, received_at)
    except InputError:
        raise
    except Exception as exc:
        raise unforeseen(exc, f"a heartbeat over {source}") from exc
