"""Topic grammar: devices/{device_id}/{heartbeat|status|commands} and its AMQP spelling."""

from __future__ import annotations

import pytest

from gateway.contract.conversion import Forward, Ignore, Reject, convert
from gateway.contract.messages import Heartbeat, StatusReport
from gateway.contract.reasons import InputError, Reason
from gateway.contract.topics import (
    Topic,
    TopicKind,
    mqtt_topic,
    parse_mqtt_topic,
    parse_routing_key,
)


@pytest.mark.parametrize(
    ("key", "device", "kind"),
    [
        ("devices.sensor-1.heartbeat", "sensor-1", TopicKind.HEARTBEAT),
        ("devices.A_b-9.status", "A_b-9", TopicKind.STATUS),
        ("devices.x.commands", "x", TopicKind.COMMANDS),
        ("devices." + "a" * 64 + ".heartbeat", "a" * 64, TopicKind.HEARTBEAT),
    ],
)
def test_valid_routing_keys(key: str, device: str, kind: TopicKind) -> None:
    topic = parse_routing_key(key)
    assert topic == Topic(device, kind)
    assert topic.routing_key == key
    assert parse_mqtt_topic(topic.mqtt) == topic


def test_dots_in_a_topic_reach_the_bridge_as_slashes() -> None:
    # RabbitMQ maps MQTT "a.b" to AMQP "a/b"; the bridge maps it back for the error message.
    assert mqtt_topic("devices.a/b.heartbeat") == "devices/a.b/heartbeat"


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("devices.a/b.heartbeat", Reason.INVALID_DEVICE_ID),  # device id with a dot
        ("devices." + "a" * 65 + ".heartbeat", Reason.INVALID_DEVICE_ID),
        ("devices.sénsor.heartbeat", Reason.INVALID_DEVICE_ID),
        ("devices..heartbeat", Reason.INVALID_DEVICE_ID),
        ("devices.x.telemetry", Reason.UNKNOWN_TOPIC),
        ("devices.x", Reason.UNKNOWN_TOPIC),
        ("devices", Reason.UNKNOWN_TOPIC),
        ("devices.x.heartbeat.extra", Reason.UNKNOWN_TOPIC),
        ("sensors.x.heartbeat", Reason.UNKNOWN_TOPIC),
    ],
)
def test_bad_topics(key: str, reason: Reason) -> None:
    with pytest.raises(InputError) as caught:
        parse_routing_key(key)
    assert caught.value.reason == reason
    assert mqtt_topic(key)[:40] in caught.value.detail or reason == Reason.INVALID_DEVICE_ID


class TestConvert:
    def test_heartbeat(self) -> None:
        out = convert("devices.s1.heartbeat", b'{"seq": 3, "cpu": 1}')
        assert isinstance(out, Forward) and isinstance(out.message, Heartbeat)
        assert (out.message.device_id, out.message.seq) == ("s1", 3)

    def test_status(self) -> None:
        out = convert("devices.s1.status", b"offline")
        assert isinstance(out, Forward) and isinstance(out.message, StatusReport)
        assert out.message.status == "offline"

    def test_bad_status(self) -> None:
        out = convert("devices.s1.status", b"sleepy")
        assert isinstance(out, Reject) and out.rejection.reason == Reason.INVALID_STATUS

    def test_commands_are_not_device_input(self) -> None:
        assert isinstance(convert("devices.s1.commands", b"reboot"), Ignore)

    def test_bad_payload_keeps_topic_device_and_bytes(self) -> None:
        out = convert("devices.s1.heartbeat", b"\x00\x01garbage")
        assert isinstance(out, Reject)
        r = out.rejection
        assert (r.device_id, r.topic, r.payload, r.size) == (
            "s1",
            "devices/s1/heartbeat",
            b"\x00\x01garbage",
            9,
        )

    def test_bad_device_id(self) -> None:
        out = convert("devices.a/b.heartbeat", b"{}")
        assert isinstance(out, Reject)
        assert out.rejection.reason == Reason.INVALID_DEVICE_ID
        assert out.rejection.topic == "devices/a.b/heartbeat"
