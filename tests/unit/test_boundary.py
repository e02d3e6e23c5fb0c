"""The trust boundary is total: whatever arrives, the bridge's conversion, the api's ingest
parse and the worker's decoding return a value or a rejection, and never raise.

Property tests over the whole range of every type (tests/hostile.py): datetimes from year 1 to
9999 in every zone and offset, epochs at and beyond the limits, floats at +-max and subnormal,
integers around 2^53, 2^63 and 2^64, text of every Unicode category, topics valid and not,
AMQP headers of every type. What is accepted survives the real path (the work queue's encoding
and the store's); no rejection is ever `unexpected_error` (that would be a bug found).
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime, timedelta
from typing import Any

import pamqp.encode
import pamqp.frame
from hostile import (
    aware_datetimes,
    dead_letter_headers,
    edge_datetimes,
    epoch_numbers,
    header_values,
    in_range_datetimes,
    payloads,
    rfc3339,
    routing_keys,
    timestamps,
    utc_instant,
    valid_dead_letter_headers,
    valid_device_ids,
    valid_payloads,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.amqp import frames
from gateway.contract.conversion import Forward, Ignore, Reject, convert, heartbeat_from
from gateway.contract.messages import (
    Heartbeat,
    Rejection,
    Source,
    StatusReport,
    WorkBatch,
    decode_work,
    encode_work,
    read_dead_letter,
    read_work,
    to_json,
)
from gateway.contract.payload import (
    EPOCH_MS_THRESHOLD,
    TS_MAX,
    TS_MIN,
    HeartbeatPayload,
    parse_timestamp,
)
from gateway.contract.reasons import MAX_DETAIL, InputError, Reason, storable_text
from gateway.contract.topics import DEVICE_ID_RE
from worker.batcher import _weight

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
T0 = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)


def travels(message: Heartbeat | StatusReport) -> None:
    """An accepted message survives the real path: the work queue's encoding, alone and in a
    batch, and the store's own encoding of its rows."""
    assert decode_work(encode_work(message)) == [message]
    assert decode_work(encode_work(WorkBatch(items=[message, message]))) == [message, message]
    to_json([message])  # what the insert sends PostgreSQL


def dead_letter_travels(rejection: Rejection) -> None:
    """A dead letter can be published (its headers as AMQP encodes them), read back by the
    worker unchanged, and stored (text PostgreSQL takes, a size that fits)."""
    headers = rejection.headers()
    pamqp.encode.field_table(headers)
    assert read_dead_letter(headers, rejection.payload) == rejection
    for text in (rejection.detail, rejection.device_id, rejection.topic):
        assert text is None or text == storable_text(text, len(text))
    assert 0 <= rejection.size < 2**31
    assert TS_MIN <= rejection.received_at <= TS_MAX


# ---- the bridge ---------------------------------------------------------------------------


@SETTINGS
@given(routing_keys, payloads())
def test_the_bridge_converts_anything_to_a_message_or_a_dead_letter(key: str, body: bytes) -> None:
    outcome = convert(key, body, T0)
    assert isinstance(outcome, Forward | Reject | Ignore)
    if isinstance(outcome, Forward):
        assert DEVICE_ID_RE.fullmatch(outcome.message.device_id)
        travels(outcome.message)
    elif isinstance(outcome, Reject):
        rejection = outcome.rejection
        assert rejection.reason != Reason.UNEXPECTED_ERROR, rejection.detail
        assert rejection.payload == body[: len(rejection.payload)] and rejection.size == len(body)
        dead_letter_travels(rejection)


def test_the_topic_strategy_makes_valid_topics_most_of_the_time() -> None:
    """Valid topics must be drawn most of the time, or the payload half of the bridge goes
    unexplored; invalid ones often enough to explore the topic half."""
    kinds: list[str] = []

    @settings(max_examples=500, database=None, derandomize=True)
    @given(routing_keys)
    def draw(key: str) -> None:
        outcome = convert(key, b"{}", T0)
        # `{}` is no reply to a command: the topic is still valid when only the body is refused.
        refused_topic = isinstance(outcome, Reject) and outcome.rejection.reason in (
            Reason.INVALID_DEVICE_ID,
            Reason.UNKNOWN_TOPIC,
        )
        kinds.append("invalid" if refused_topic else "valid")

    draw()
    assert kinds.count("valid") > len(kinds) / 2, kinds.count("valid")
    assert kinds.count("invalid") >= len(kinds) / 5, kinds.count("invalid")


@SETTINGS
@given(valid_device_ids, payloads())
def test_a_heartbeat_on_a_valid_topic_is_forwarded_or_refused(device: str, body: bytes) -> None:
    outcome = convert(f"devices.{device}.heartbeat", body, T0)
    if isinstance(outcome, Reject):
        assert outcome.rejection.device_id == device
        assert outcome.rejection.reason != Reason.UNEXPECTED_ERROR, outcome.rejection.detail
        return
    assert isinstance(outcome, Forward)
    assert outcome.message.device_id == device
    travels(outcome.message)


@SETTINGS
@given(valid_device_ids, st.sampled_from(["foo", "", "#", "heartbeat.x", "ü"]))
def test_an_unknown_topic_is_still_its_devices_dead_letter(device: str, kind: str) -> None:
    """The broker lets a device publish only under its own id: a topic that does not parse is
    still filed under that device (found by device, counted against its cap)."""
    outcome = convert(f"devices.{device}.{kind}", b"{}", T0)
    assert isinstance(outcome, Reject)
    assert outcome.rejection.reason == Reason.UNKNOWN_TOPIC
    assert outcome.rejection.device_id == device


def test_an_unforeseen_exception_becomes_its_own_dead_letter(monkeypatch) -> None:
    """Whatever the parser raises, convert() returns: a dead letter that names the exception."""

    def broken(raw: bytes) -> HeartbeatPayload:
        raise OverflowError("date value out of range")

    monkeypatch.setattr("gateway.contract.conversion.parse_payload", broken)
    outcome = convert("devices.d-1.heartbeat", b"{}", T0)
    assert isinstance(outcome, Reject)
    assert outcome.rejection.reason == Reason.UNEXPECTED_ERROR
    assert outcome.rejection.detail == "OverflowError: date value out of range"
    assert outcome.rejection.device_id == "d-1"
    with_http = None
    try:
        heartbeat_from("d-1", b"{}", Source.HTTP, T0)
    except InputError as error:
        with_http = error
    assert with_http is not None and with_http.reason == Reason.UNEXPECTED_ERROR


@SETTINGS
@given(valid_payloads(), st.booleans())
def test_every_well_formed_heartbeat_is_accepted_as_sent(body: dict, ascii_only: bool) -> None:
    """The other half of totality: nothing within the contract is refused, at any extreme."""
    raw = json.dumps(body, ensure_ascii=ascii_only).encode()
    outcome = convert("devices.d-1.heartbeat", raw, T0)
    assert isinstance(outcome, Forward), outcome.rejection.detail
    beat = outcome.message
    assert (beat.seq, beat.device_ts is None) == (body["seq"], body["ts"] is None)
    sent = body.get("metrics") or {k: v for k, v in body.items() if k not in _KNOWN}
    assert beat.metrics == sent
    travels(beat)


_KNOWN = {"ts", "seq", "msg_id", "metrics"}


# ---- the api's ingest parse ---------------------------------------------------------------


@SETTINGS
@given(payloads())
def test_the_http_ingest_parse_returns_a_heartbeat_or_an_input_error(body: bytes) -> None:
    try:
        beat = heartbeat_from("d-1", body, Source.HTTP, T0)
    except InputError as error:
        assert error.reason != Reason.UNEXPECTED_ERROR, error.detail
        assert error.detail == storable_text(error.detail) and len(error.detail) <= MAX_DETAIL
        json.dumps({"detail": error.detail}, ensure_ascii=False).encode()  # the 4xx's body
        return
    travels(beat)


# ---- ts over its whole range --------------------------------------------------------------


@SETTINGS
@given(aware_datetimes | edge_datetimes(), st.sampled_from(["auto", "seconds", "microseconds"]))
def test_ts_text_is_accepted_exactly_within_its_range(moment: datetime, timespec: str) -> None:
    text = rfc3339(moment, timespec)
    expected = utc_instant(datetime.fromisoformat(text))
    in_range = expected is not None and TS_MIN <= expected <= TS_MAX
    try:
        parsed = parse_timestamp(text)
    except ValueError as error:
        assert not in_range, f"{text} refused: {error}"
        assert "ts" in str(error)
        return
    assert in_range, f"{text} accepted as {parsed}"
    assert parsed == expected and parsed.tzinfo is UTC
    outcome = convert("devices.d-1.heartbeat", json.dumps({"ts": text}).encode(), T0)
    assert isinstance(outcome, Forward) and outcome.message.device_ts == expected
    travels(outcome.message)


@SETTINGS
@given(epoch_numbers)
def test_epoch_ts_is_seconds_then_milliseconds_within_the_range(value: int | float) -> None:
    """Epoch seconds below 1e11, milliseconds from there; from 0 to TS_MAX, both included."""
    in_range = 0 <= value <= int(TS_MAX.timestamp()) * 1000
    try:
        parsed = parse_timestamp(value)
    except ValueError as error:
        assert not in_range, f"{value!r} refused: {error}"
        assert str(error).startswith("ts ") and "out of range" in str(error)
        return
    assert in_range and TS_MIN <= parsed <= TS_MAX
    if isinstance(value, int):  # exact, to the millisecond
        unit = timedelta(milliseconds=1) if value >= EPOCH_MS_THRESHOLD else timedelta(seconds=1)
        assert parsed == TS_MIN + value * unit


@SETTINGS
@given(timestamps)
def test_any_ts_is_accepted_or_refused_naming_ts(value: Any) -> None:
    outcome = convert("devices.d-1.heartbeat", json.dumps({"ts": value}).encode(), T0)
    if isinstance(outcome, Reject):
        assert outcome.rejection.reason in (Reason.INVALID_FIELD, Reason.NOT_UTF8)
        assert "ts" in outcome.rejection.detail or outcome.rejection.reason == Reason.NOT_UTF8
        return
    assert isinstance(outcome, Forward)
    assert TS_MIN <= outcome.message.device_ts <= TS_MAX
    travels(outcome.message)


@SETTINGS
@given(in_range_datetimes)
def test_every_time_within_the_range_is_accepted_in_any_zone(moment: datetime) -> None:
    expected = utc_instant(moment)
    assume(expected is not None and TS_MIN <= expected <= TS_MAX)
    assert parse_timestamp(moment.isoformat()) == expected


# ---- the worker's decoding ----------------------------------------------------------------


def _beat(device: str, msg_id: str) -> Heartbeat:
    payload = HeartbeatPayload(msg_id=msg_id, seq=1, metrics={"cpu": 1.5})
    return Heartbeat.from_payload(device, payload, Source.MQTT, T0)


_FIELDS = ["kind", "id", "device_id", "msg_id", "seq", "device_ts", "received_at", "source"]
mutations = st.tuples(st.sampled_from([*_FIELDS, "metrics", "extra"]), header_values)


def _mutated(beat: Heartbeat, field: str, value: Any) -> dict[str, Any]:
    item = json.loads(encode_work(beat))
    item[field] = value if field != "metrics" else {"m": value}
    return item


def _json_safe(value: Any) -> Any:
    """`value` as JSON can carry it (what another process could have put on the queue)."""
    return json.loads(json.dumps(value, default=str, ensure_ascii=True))


@SETTINGS
@given(st.binary(max_size=512) | payloads())
def test_the_worker_reads_any_bytes_as_messages_or_dead_letters(body: bytes) -> None:
    good, bad = read_work(body)
    for message in good:
        travels(message)
    for rejection in bad:
        assert rejection.reason == Reason.INVALID_MESSAGE, rejection.detail
        dead_letter_travels(rejection)
    assert good or bad


@SETTINGS
@given(st.lists(st.booleans() | mutations, min_size=1, max_size=6))
def test_one_bad_item_does_not_take_a_batch_down(plan: list) -> None:
    """A batch with items that are not canonical: the others are stored, each bad one is a dead
    letter of its own, under its device."""
    items, valid = [], []
    for i, step in enumerate(plan):
        beat = _beat(f"dev-{i}", f"m-{i}")
        if step is True or step is False:
            items.append(json.loads(encode_work(beat)))
            valid.append(beat)
        else:
            field, value = step
            items.append(_json_safe(_mutated(beat, field, value)))
    body = json.dumps({"kind": "batch", "id": str(_beat("b", "b").id), "items": items})
    good, bad = read_work(body.encode())
    assert [m for m in good if m in valid] == valid
    assert len(good) + len(bad) == len(items)
    for rejection in bad:
        assert rejection.reason == Reason.INVALID_MESSAGE
        claimed = {i.get("device_id") for i in items if isinstance(i.get("device_id"), str)}
        assert rejection.device_id is None or rejection.device_id in claimed
        dead_letter_travels(rejection)
    for message in good:
        travels(message)


@SETTINGS
@given(st.sampled_from([*_FIELDS, "metrics"]), header_values)
def test_a_heartbeat_with_any_field_replaced_is_read_or_dead_lettered(field: str, value) -> None:
    body = json.dumps(_json_safe(_mutated(_beat("d-1", "m-1"), field, value))).encode()
    good, bad = read_work(body)
    assert len(good) + len(bad) == 1
    for message in good:
        travels(message)
    for rejection in bad:
        assert rejection.device_id in (None, "d-1") or field == "device_id"
        dead_letter_travels(rejection)


@SETTINGS
@given(dead_letter_headers, st.binary(max_size=300))
def test_the_worker_reads_any_dead_letter_headers(headers: dict, body: bytes) -> None:
    rejection = read_dead_letter(headers, body)
    assert rejection.reason != Reason.UNEXPECTED_ERROR, rejection.detail
    dead_letter_travels(rejection)


@SETTINGS
@given(st.sampled_from(list(valid_dead_letter_headers(3))), header_values)
def test_a_dead_letter_with_one_header_of_any_type_is_kept(field: str, value) -> None:
    headers = {**valid_dead_letter_headers(3), "x-gateway-detail": "d", field: value}
    rejection = read_dead_letter(headers, b"abc")
    assert rejection.payload == b"abc"
    dead_letter_travels(rejection)


@SETTINGS
@given(header_values | st.just(None), st.booleans())
def test_the_batch_weight_takes_a_header_of_any_type(value: Any, present: bool) -> None:
    class Message:
        headers = {"x-gateway-items": value} if present else None

    assert 1 <= _weight(Message()) <= 1000  # type: ignore[arg-type]


# ---- AMQP frames: any bytes -----------------------------------------------------------------


def _short(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def _deliver_frame(routing_key: bytes) -> bytes:
    """A Basic.Deliver method frame with these routing-key bytes, as the broker sends it."""
    args = (
        _short(b"ctag")
        + struct.pack(">Q", 1)
        + b"\x00"
        + _short(b"amq.topic")
        + _short(routing_key)
    )
    payload = struct.pack(">HH", 60, 60) + args
    return struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce"


def _header_frame(table: bytes) -> bytes:
    """A content header frame whose only property is the headers table `table` (its body)."""
    props = struct.pack(">H", 1 << 13) + struct.pack(">I", len(table)) + table
    payload = struct.pack(">HHQ", 60, 0, 3) + props
    return struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"


@SETTINGS
@given(st.binary(max_size=255))
def test_a_routing_key_of_any_bytes_decodes(raw: bytes) -> None:
    frames.install()
    _, _, deliver = pamqp.frame.unmarshal(_deliver_frame(raw))
    assert deliver.routing_key == raw.decode("utf-8", "surrogateescape")
    outcome = convert(deliver.routing_key, b"{}", T0)
    if isinstance(outcome, Reject):
        dead_letter_travels(outcome.rejection)


@SETTINGS
@given(st.binary(max_size=60), st.integers(0, 2**64 - 1), st.binary(max_size=40))
def test_a_header_table_of_any_bytes_decodes(key: bytes, stamp: int, value: bytes) -> None:
    frames.install()
    table = (
        _short(key)
        + b"S"
        + struct.pack(">I", len(value))
        + value
        + _short(b"t")
        + b"T"
        + struct.pack(">Q", stamp)
        + _short(b"nested")
        + b"F"
        + struct.pack(">I", len(key) + 2)
        + _short(key)
        + b"V"
    )
    _, _, header = pamqp.frame.unmarshal(_header_frame(table))
    headers = header.properties.headers
    assert headers["nested"] == {key.decode("utf-8", "surrogateescape"): None}
    assert isinstance(headers["t"], datetime | None)
    rejection = read_dead_letter(headers, b"x")
    dead_letter_travels(rejection)
