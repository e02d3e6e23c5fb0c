"""The command contract without services: reply conversion is total, requests are bounded,
and the access rules let a device reply only for itself."""

from __future__ import annotations

import contextlib
import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.amqp import access
from gateway.contract.commands import CommandReply, CommandRequest, CommandStatus, parse_reply
from gateway.contract.conversion import ForwardReply, Ignore, Reject, convert
from gateway.contract.messages import Source
from gateway.contract.reasons import InputError, Reason

CID = str(uuid.uuid4())


def test_a_reply_converts() -> None:
    body = json.dumps({"id": CID, "status": "failed", "result": {"error": "busy"}}).encode()
    reply = parse_reply("pump-1", body, Source.MQTT)
    assert reply.command_id == uuid.UUID(CID) and reply.status == CommandStatus.FAILED
    assert reply.result == {"error": "busy"} and reply.device_id == "pump-1"
    assert CommandReply.decode(reply.encode()) == reply


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", Reason.NOT_JSON),
        (b"[]", Reason.NOT_AN_OBJECT),
        (b"\xff", Reason.NOT_UTF8),
        (json.dumps({"id": CID, "status": "sent"}).encode(), Reason.INVALID_FIELD),
        (json.dumps({"id": CID}).encode(), Reason.INVALID_FIELD),
        (json.dumps({"id": 7, "status": "succeeded"}).encode(), Reason.INVALID_FIELD),
        (json.dumps({"id": "x", "status": "succeeded"}).encode(), Reason.UNKNOWN_COMMAND),
        (json.dumps({"id": CID, "status": "succeeded", "extra": 1}).encode(), Reason.INVALID_FIELD),
        (
            json.dumps({"id": CID, "status": "succeeded", "result": []}).encode(),
            Reason.INVALID_FIELD,
        ),
        (
            json.dumps({"id": CID, "status": "succeeded", "result": {"x": "a" * 9000}}).encode(),
            Reason.INVALID_FIELD,
        ),
        # jsonb refuses \u0000 (a NUL in a key or a string): refused here, not by the database.
        (
            json.dumps({"id": CID, "status": "failed", "result": {"a\x00": 1}}).encode(),
            Reason.INVALID_FIELD,
        ),
        (
            json.dumps({"id": CID, "status": "failed", "result": {"a": ["\x00"]}}).encode(),
            Reason.INVALID_FIELD,
        ),
        (b'{"id": "' + b"a" * 17000 + b'"}', Reason.TOO_LARGE),
        (b'{"id": 1, "id": 2}', Reason.DUPLICATE_KEY),
    ],
)
def test_a_bad_reply_is_refused_with_its_reason(body: bytes, reason: Reason) -> None:
    with pytest.raises(InputError) as refused:
        parse_reply("pump-1", body, Source.HTTP)
    assert refused.value.reason == reason


@given(st.binary(max_size=300))
def test_reply_conversion_is_total(body: bytes) -> None:
    with contextlib.suppress(InputError):
        parse_reply("pump-1", body, Source.MQTT)
    outcome = convert("devices.pump-1.replies", body)
    assert isinstance(outcome, ForwardReply | Reject)


@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=30,
    )
)
def test_any_json_result_converts_or_is_refused(result) -> None:
    body = json.dumps({"id": CID, "status": "succeeded", "result": result}).encode()
    try:
        parse_reply("pump-1", body, Source.MQTT)
    except InputError as refused:
        assert refused.reason in set(Reason)


def test_the_gateways_own_commands_in_the_inbox_are_ignored() -> None:
    assert isinstance(convert("devices.pump-1.commands", b"{}"), Ignore)


def test_requests_are_bounded() -> None:
    assert CommandRequest(name="reboot").ttl_s == 600
    for bad in (
        {"name": "a b"},
        {"name": "x", "ttl_s": 0},
        {"name": "x", "ttl_s": 7 * 24 * 3600 + 1},
        {"name": "x", "args": {"k": "v" * 9000}},
        {"name": "x", "args": [1]},
        # Found by the api fuzz: a NUL in a key of args was a 500 (jsonb refuses \u0000).
        {"name": "0", "args": {"\x002": "", "b": 1}},
        {"name": "x", "args": {"a": [{"b": "c\x00"}]}},
        {"name": "x", "args": {"\ud80b\udd4e": 1}},
        {"name": "x", "other": 1},
    ):
        with pytest.raises(ValidationError):
            CommandRequest.model_validate(bad)


def test_a_device_writes_its_own_replies_and_reads_only_its_own_commands() -> None:
    assert access.topic_allowed("a", "amq.topic", "write", "devices.a.replies")
    assert not access.topic_allowed("a", "amq.topic", "write", "devices.b.replies")
    assert not access.topic_allowed("a", "amq.topic", "write", "devices.a.commands")
    assert access.topic_allowed("a", "amq.topic", "read", "devices.a.commands")
    assert not access.topic_allowed("a", "amq.topic", "read", "devices.b.commands")
    assert not access.topic_allowed("a", "amq.topic", "read", "devices.a.replies")
