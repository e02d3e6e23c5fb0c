"""Property tests: arbitrary bytes and topics either parse or are refused with a reason; and
tests of the strategies themselves, that they reach what they are meant to explore (a `ts` in
every form and on both sides of its range, valid topics most of the time)."""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from hostile import (
    in_range_ts,
    payloads,
    routing_keys,
    utc_instant,
    valid_metric_names,
    valid_metric_values,
    valid_payloads,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.contract.conversion import Forward, Ignore, Reject, convert
from gateway.contract.messages import Heartbeat, Source, WorkBatch, decode_work, encode_work
from gateway.contract.payload import (
    EPOCH,
    EPOCH_MS_THRESHOLD,
    MAX_PAYLOAD_BYTES,
    TS_MAX,
    TS_MIN,
    HeartbeatPayload,
    parse_payload,
)
from gateway.contract.reasons import InputError, Reason
from gateway.contract.topics import DEVICE_ID_RE, Topic, TopicKind, parse_routing_key

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Any text, with a lone surrogate now and then (`json.dumps` escapes it as `\\ud800`).
lone_surrogates = st.integers(0xD800, 0xDFFF).map(chr)
any_text = st.text(max_size=40) | st.builds(
    lambda before, surrogate, after: before + surrogate + after,
    st.text(max_size=10),
    lone_surrogates,
    st.text(max_size=10),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=20,
)


def outcome_of(raw: bytes) -> HeartbeatPayload | InputError:
    try:
        return parse_payload(raw)
    except InputError as error:
        assert isinstance(error.reason, Reason)
        assert error.detail and len(error.detail) < 2000
        return error


@SETTINGS
@given(st.binary(max_size=MAX_PAYLOAD_BYTES + 64))
def test_arbitrary_bytes_parse_or_are_refused(raw: bytes) -> None:
    outcome_of(raw)


@SETTINGS
@given(json_values)
def test_arbitrary_json_parses_or_is_refused(value: object) -> None:
    result = outcome_of(json.dumps(value).encode())
    if isinstance(result, HeartbeatPayload):
        assert isinstance(value, dict)
        # What parsed can be turned into a canonical message, sent on the work queue alone or
        # in a batch, and read back unchanged.
        beat = Heartbeat.from_payload("d-1", result, Source.HTTP)
        assert decode_work(encode_work(beat)) == [beat]
        assert decode_work(encode_work(WorkBatch(items=[beat, beat]))) == [beat, beat]


metric_names = valid_metric_names
metric_values = valid_metric_values


def instant_of(ts: str | int | float) -> datetime | None:
    """The UTC time a `ts` names, worked out apart from the parser: RFC 3339 text, or epoch
    seconds below `EPOCH_MS_THRESHOLD` and milliseconds from there."""
    if isinstance(ts, str):
        return utc_instant(datetime.fromisoformat(ts))
    unit = timedelta(milliseconds=1) if ts >= EPOCH_MS_THRESHOLD else timedelta(seconds=1)
    return EPOCH + ts * unit


@SETTINGS
@given(
    ts=st.none() | in_range_ts,
    seq=st.none() | st.integers(min_value=0, max_value=2**63 - 1),
    msg_id=st.none() | st.from_regex(r"[\x21-\x7e]{1,128}", fullmatch=True),
    metrics=st.dictionaries(metric_names, metric_values, max_size=20),
    nested=st.booleans(),
)
def test_valid_payloads_parse_to_what_was_sent(ts, seq, msg_id, metrics, nested) -> None:
    body: dict = {"ts": ts, "seq": seq, "msg_id": msg_id}
    body.update({"metrics": metrics} if nested else metrics)
    parsed = parse_payload(json.dumps(body).encode())
    assert (parsed.seq, parsed.msg_id) == (seq, msg_id)
    if ts is None:
        assert parsed.ts is None
    elif isinstance(ts, float):  # a float's fraction, to the microsecond
        assert abs(parsed.ts - instant_of(ts)) <= timedelta(milliseconds=1)
    else:
        assert parsed.ts == instant_of(ts)
    assert parsed.metrics.keys() == metrics.keys()
    for name, value in metrics.items():
        got = parsed.metrics[name]
        assert got == value or (isinstance(value, float) and math.isclose(got, value))


@SETTINGS
@given(st.dictionaries(metric_names, any_text | metric_values, min_size=1, max_size=5))
def test_any_text_is_refused_or_reaches_the_worker_unchanged(metrics) -> None:
    """A lone surrogate (`\\ud800`) is valid JSON text but no character: it is refused at the
    door, never left to fail the encoding of a batch it shares with other devices."""
    outcome = outcome_of(json.dumps(metrics).encode())
    if isinstance(outcome, InputError):
        assert outcome.reason in (Reason.NOT_UTF8, Reason.INVALID_FIELD)
        return
    beat = Heartbeat.from_payload("d-1", outcome, Source.MQTT)
    assert decode_work(encode_work(WorkBatch(items=[beat]))) == [beat]


@SETTINGS
@given(routing_keys | st.text(max_size=200))
def test_arbitrary_routing_keys_parse_or_are_refused(key: str) -> None:
    try:
        topic = parse_routing_key(key)
    except InputError as error:
        assert error.reason in (Reason.UNKNOWN_TOPIC, Reason.INVALID_DEVICE_ID)
        return
    assert isinstance(topic, Topic)
    assert DEVICE_ID_RE.fullmatch(topic.device_id)
    assert topic.routing_key == key


@SETTINGS
@given(st.sampled_from(list(TopicKind)), st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True))
def test_every_valid_topic_parses(kind: TopicKind, device_id: str) -> None:
    assert parse_routing_key(f"devices.{device_id}.{kind}") == Topic(device_id, kind)


@SETTINGS
@given(routing_keys, st.binary(max_size=2048))
def test_the_bridge_never_raises(key: str, body: bytes) -> None:
    outcome = convert(key, body)
    assert isinstance(outcome, Forward | Reject | Ignore)
    if isinstance(outcome, Reject):
        assert outcome.rejection.payload == body[: len(outcome.rejection.payload)]


# ---- the strategies themselves ------------------------------------------------------------


def ts_form(body: dict[str, Any]) -> str:
    """Which form of `ts` a payload carries, and on which side of the range it falls."""
    if "ts" not in body:
        return "absent"
    ts = body["ts"]
    if isinstance(ts, bool) or not isinstance(ts, str | int | float):
        return "another type"
    if isinstance(ts, int | float):
        if ts < 0:
            return "epoch below 0"
        if ts > int(TS_MAX.timestamp()) * 1000:
            return "epoch past the end"
        if isinstance(ts, float) and not ts.is_integer():
            return "epoch with a fraction"
        return "epoch seconds" if ts < EPOCH_MS_THRESHOLD else "epoch milliseconds"
    try:
        moment = datetime.fromisoformat(ts)
    except ValueError:
        return "text that is no time"
    if moment.tzinfo is None:
        return "text without an offset"
    instant = utc_instant(moment)
    if instant is None or instant < TS_MIN:
        return "text before the range"
    if instant > TS_MAX:
        return "text after the range"
    return "text with Z" if ts.endswith("Z") else "text with an offset"


def drawn(strategy: st.SearchStrategy, count: int) -> list:
    """`count` examples of `strategy`, as the property tests draw them (always the same)."""
    examples: list = []

    @settings(
        max_examples=count,
        database=None,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def draw(example: Any) -> None:
        examples.append(example)

    draw()
    return examples


EVERY_TS_FORM = {
    "absent",
    "another type",
    "epoch below 0",
    "epoch past the end",
    "epoch with a fraction",
    "epoch seconds",
    "epoch milliseconds",
    "text that is no time",
    "text without an offset",
    "text before the range",
    "text after the range",
    "text with Z",
    "text with an offset",
}


def test_hostile_payloads_reach_ts_in_every_form_and_on_both_sides_of_its_range() -> None:
    objects = []
    for body in drawn(payloads(), 2000):
        try:
            value = json.loads(body)
        except ValueError:
            continue
        if isinstance(value, dict):
            objects.append(value)
    forms = Counter(ts_form(body) for body in objects)
    assert forms.keys() == EVERY_TS_FORM, EVERY_TS_FORM - forms.keys()
    assert forms["absent"] <= len(objects) * 0.75, forms  # a ts in a good share of them


def test_valid_payloads_reach_ts_in_every_accepted_form_across_its_range() -> None:
    bodies = drawn(valid_payloads(), 1000)
    forms = Counter(ts_form(body) if body["ts"] is not None else "null" for body in bodies)
    accepted = {
        "null",
        "epoch seconds",
        "epoch milliseconds",
        "epoch with a fraction",
        "text with Z",
        "text with an offset",
    }
    assert forms.keys() == accepted, forms
    years = {instant_of(body["ts"]).year for body in bodies if body["ts"] is not None}
    assert min(years) == 1970 and max(years) >= 9999 - 1, (min(years), max(years))
