"""Payload parsing: every shape DESIGN.md allows, and every kind of bad input, by reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from support import SEED_SHAPE

from gateway.contract.messages import Heartbeat, Source, idempotency_key
from gateway.contract.payload import MAX_PAYLOAD_BYTES, HeartbeatPayload, parse_payload
from gateway.contract.reasons import InputError, Reason


def parse(obj: object) -> HeartbeatPayload:
    return parse_payload(json.dumps(obj).encode())


def reason_of(raw: bytes) -> tuple[Reason, str]:
    with pytest.raises(InputError) as caught:
        parse_payload(raw)
    return caught.value.reason, caught.value.detail


@pytest.mark.parametrize("raw", [b"", b"   ", b"\n"])
def test_empty_body_is_a_liveness_heartbeat(raw: bytes) -> None:
    assert parse_payload(raw) == HeartbeatPayload()


def test_design_example() -> None:
    p = parse(
        {"ts": "2026-11-29T10:00:00Z", "seq": 1041, "msg_id": "b7c1", "cpu": 12.5, "temp_c": 48.2}
    )
    assert p.ts == datetime(2026, 11, 29, 10, tzinfo=UTC)
    assert (p.seq, p.msg_id) == (1041, "b7c1")
    assert p.metrics == {"cpu": 12.5, "temp_c": 48.2}


def test_nested_metrics_equal_flat_ones() -> None:
    assert parse({"seq": 1, "metrics": {"cpu": 1.5}}) == parse({"seq": 1, "cpu": 1.5})


def test_seed_shape_stores_every_field_as_a_metric() -> None:
    assert parse(SEED_SHAPE).metrics == SEED_SHAPE


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-11-29T10:00:00Z", datetime(2026, 11, 29, 10, tzinfo=UTC)),
        ("2026-11-29T12:00:00+02:00", datetime(2026, 11, 29, 10, tzinfo=UTC)),
        (1796119200, datetime(2026, 12, 1, 10, tzinfo=UTC)),
        (1796119200000, datetime(2026, 12, 1, 10, tzinfo=UTC)),
        (1796119200.5, datetime(2026, 12, 1, 10, 0, 0, 500000, tzinfo=UTC)),
    ],
)
def test_timestamps(ts: object, expected: datetime) -> None:
    assert parse({"ts": ts}).ts == expected


def test_metric_values_keep_their_type() -> None:
    metrics = parse({"on": True, "n": 3, "x": 1.25, "fw": "1.2.3"}).metrics
    assert metrics == {"on": True, "n": 3, "x": 1.25, "fw": "1.2.3"}
    assert type(metrics["on"]) is bool and type(metrics["n"]) is int


@pytest.mark.parametrize(
    ("raw", "reason", "words"),
    [
        (b"not json", Reason.NOT_JSON, "not JSON"),
        (b"\xff\xfe{}", Reason.NOT_UTF8, "UTF-8"),
        (b"[1, 2]", Reason.NOT_AN_OBJECT, "an array"),
        (b'"hello"', Reason.NOT_AN_OBJECT, "a string"),
        (b"42", Reason.NOT_AN_OBJECT, "a number"),
        (b"null", Reason.NOT_AN_OBJECT, "null"),
        (b'{"cpu": NaN}', Reason.NON_FINITE_NUMBER, "NaN"),
        (b'{"cpu": Infinity}', Reason.NON_FINITE_NUMBER, "Infinity"),
        (b'{"cpu": -Infinity}', Reason.NON_FINITE_NUMBER, "Infinity"),
        (b'{"cpu": 1e999}', Reason.NON_FINITE_NUMBER, "too large"),
        (b'{"cpu": 1, "cpu": 2}', Reason.DUPLICATE_KEY, "'cpu'"),
        (b'{"a": ' * 3000 + b"1" + b"}" * 3000, Reason.TOO_LARGE, "limit"),
        (b'{"m": {"a": {"b": {"c": {"d": 1}}}}}', Reason.TOO_DEEP, "nested"),
        (b"[" * 5000 + b"]" * 5000, Reason.TOO_DEEP, "nested"),
        # Deep enough to overflow a recursive depth count, not the JSON decoder.
        (b'{"x": ' + b"[" * 600 + b"1" + b"]" * 600 + b"}", Reason.TOO_DEEP, "nested"),
        (b'{"name": "\\ud800"}', Reason.NOT_UTF8, "lone surrogate"),
        (b'{"\\udfff": 1}', Reason.NOT_UTF8, "lone surrogate"),
        (b'{"seq": -1}', Reason.INVALID_FIELD, "seq"),
        (b'{"seq": "7"}', Reason.INVALID_FIELD, "seq"),
        (b'{"seq": true}', Reason.INVALID_FIELD, "seq"),
        (b'{"seq": 99999999999999999999}', Reason.INVALID_FIELD, "seq"),
        (b'{"ts": "yesterday"}', Reason.INVALID_FIELD, "RFC 3339"),
        (b'{"ts": "2026-11-29T10:00:00"}', Reason.INVALID_FIELD, "UTC offset"),
        (b'{"ts": true}', Reason.INVALID_FIELD, "ts"),
        (b'{"msg_id": ""}', Reason.INVALID_FIELD, "msg_id"),
        (b'{"msg_id": "has space"}', Reason.INVALID_FIELD, "msg_id"),
        (b'{"metrics": [1, 2]}', Reason.INVALID_FIELD, "metrics"),
        (b'{"cpu": {"nested": 1}}', Reason.INVALID_FIELD, "cpu"),
        (b'{"cpu": [1]}', Reason.INVALID_FIELD, "cpu"),
        (b'{"cpu": null}', Reason.INVALID_FIELD, "cpu"),
        (b'{"bad name": 1}', Reason.INVALID_FIELD, "bad name"),
        (b'{"cpu": 1, "metrics": {"cpu": 2}}', Reason.INVALID_FIELD, "both"),
        (b'{"fw": "' + b"x" * 300 + b'"}', Reason.INVALID_FIELD, "fw"),
        (b'{"x": 123456789012345678901234567890}', Reason.INVALID_FIELD, "x"),
    ],
)
def test_bad_input_is_refused_with_a_reason_that_names_it(
    raw: bytes, reason: Reason, words: str
) -> None:
    got_reason, detail = reason_of(raw)
    assert got_reason == reason, detail
    assert words in detail


def test_size_limit_is_16_kib() -> None:
    filler = "x" * 200
    fits = {f"m{i}": filler for i in range(70)}
    body = json.dumps(fits).encode()
    assert len(body) <= MAX_PAYLOAD_BYTES
    parse_payload(body)
    assert reason_of(body + b" " * (MAX_PAYLOAD_BYTES - len(body) + 1))[0] == Reason.TOO_LARGE


def test_too_many_metrics() -> None:
    reason, detail = reason_of(json.dumps({f"m{i}": i for i in range(200)}).encode())
    assert reason == Reason.INVALID_FIELD and "metrics" in detail


class TestIdempotencyKey:
    def test_msg_id_wins(self) -> None:
        assert idempotency_key(parse({"msg_id": "abc", "seq": 1})) == "abc"

    def test_seq_with_ts_names_one_heartbeat(self) -> None:
        a = parse({"seq": 5, "ts": 1796119200})
        assert idempotency_key(a) == idempotency_key(parse({"seq": 5, "ts": 1796119200000}))

    def test_without_either_every_heartbeat_is_new(self) -> None:
        assert idempotency_key(parse({"seq": 5})) != idempotency_key(parse({"seq": 5}))
        assert idempotency_key(HeartbeatPayload()) != idempotency_key(HeartbeatPayload())

    def test_same_key_same_id_across_sources(self) -> None:
        p = parse({"msg_id": "m-1"})
        mqtt = Heartbeat.from_payload("d1", p, Source.MQTT)
        http = Heartbeat.from_payload("d1", p, Source.HTTP)
        other = Heartbeat.from_payload("d2", p, Source.HTTP)
        assert mqtt.id == http.id != other.id
