"""Hypothesis strategies for what a hostile device (or a broken peer) can send: the whole range
of every type the payload, the topic and the AMQP headers take, not a friendly slice.

Shared by the property tests; the hostile-neighbour test draws its stream from `hostile_stream`
(a seeded generator over the same values, since hypothesis' strategies are for tests only).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import random
import socket
import struct
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from gateway.contract.payload import EPOCH_MS_THRESHOLD, MAX_INT, TS_MAX, TS_MIN
from gateway.contract.topics import TopicKind

CORPUS = Path(__file__).parent / "corpus"

# ---- numbers ------------------------------------------------------------------------------

_TS_MAX_S = int(TS_MAX.timestamp())
#: Integers where something changes: word sizes, float precision, the epoch rules.
INTEGER_EDGES = [
    0,
    1,
    2**31 - 1,
    2**31,
    2**32,
    2**53 - 1,
    2**53,
    2**53 + 1,
    MAX_INT,
    2**63,
    2**64 - 1,
    2**64,
    EPOCH_MS_THRESHOLD,
    _TS_MAX_S,
    _TS_MAX_S * 1000,
    10**30,
    10**400,
]
integers = (
    st.integers()
    | st.sampled_from(INTEGER_EDGES).flatmap(lambda n: st.integers(n - 2, n + 2))
    | st.sampled_from(INTEGER_EDGES).map(lambda n: -n)
    | st.integers(min_value=-(2**70), max_value=2**70)
)
FLOAT_EDGES = [
    0.0,
    -0.0,
    5e-324,  # the smallest subnormal
    -5e-324,
    2.2250738585072014e-308,  # the smallest normal
    sys.float_info.max,
    -sys.float_info.max,
    1e308,
    -1e308,
    float(2**53),
    float(2**63),
    float(2**64),
    float(EPOCH_MS_THRESHOLD),
    float(_TS_MAX_S * 1000),
    0.1,
]
finite_floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(FLOAT_EDGES)

# ---- text ---------------------------------------------------------------------------------

#: Characters worth trying on purpose: NUL, controls, right-to-left marks and overrides, a BOM,
#: line and paragraph separators, non-characters, a lone surrogate of each half, combining
#: marks, an astral character.
SPECIAL_CHARACTERS = (
    "\x00\x01\x1f\x7f\x85\u200b\u200e\u200f\u202a\u202e\u2066\u2069\ufeff\u2028\u2029"
    "\ufffe\uffff\ud800\udbff\udc00\udfff\u0301\u20dd\U0001f600\U0010ffff"
)
#: Any code point of any Unicode category, lone surrogates included.
any_character = st.characters(codec=None, exclude_categories=()) | st.sampled_from(
    SPECIAL_CHARACTERS
)
any_text = st.text(any_character, max_size=40)
valid_device_ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
valid_metric_names = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True).filter(
    lambda n: n not in ("ts", "seq", "msg_id", "metrics")
)
metric_names = valid_metric_names | any_text | st.just("x" * 65)
#: Every value a metric may hold and be stored as sent.
valid_metric_values = (
    st.booleans()
    | st.integers(min_value=-(2**63 - 1), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=256).filter(lambda s: "\x00" not in s)
)

# ---- timestamps ---------------------------------------------------------------------------

#: Fixed UTC offsets over the whole range datetime takes, to the second.
fixed_offsets = st.integers(-86399, 86399).map(lambda s: timezone(timedelta(seconds=s))) | (
    st.integers(-24 * 60 + 1, 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
)
aware_datetimes = st.datetimes(
    min_value=datetime.min,
    max_value=datetime.max,
    timezones=st.timezones() | fixed_offsets | st.just(UTC),
)
#: The instants the ts range takes, in any zone: what a device with a sane clock sends.
in_range_datetimes = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(9999, 12, 29),
    timezones=st.timezones() | fixed_offsets,
)


@st.composite
def edge_datetimes(draw: st.DrawFn) -> datetime:
    """Wall-clock times within a day of the ts range's ends and of datetime's own, with any
    offset: where a conversion to UTC leaves the range, or datetime."""
    edge = draw(st.sampled_from([TS_MIN, TS_MAX, datetime.min, datetime.max]))
    wall = edge.replace(tzinfo=None)
    shift = draw(st.timedeltas(min_value=timedelta(days=-1), max_value=timedelta(days=1)))
    with contextlib.suppress(OverflowError):
        wall += shift
    return wall.replace(tzinfo=draw(fixed_offsets | st.just(UTC)))


#: Session time zones at the extremes: the furthest ahead and behind of UTC, offsets of half and
#: three quarters of an hour, and one whose offset had seconds in its history.
SESSION_ZONES = [
    "UTC",
    "Pacific/Kiritimati",
    "Etc/GMT+12",
    "Asia/Kathmandu",
    "America/St_Johns",
    "Africa/Monrovia",
    "Europe/Amsterdam",
]


def utc_instant(moment: datetime) -> datetime | None:
    """`moment` in UTC, or None when that falls outside what datetime holds."""
    offset = moment.utcoffset()
    assert offset is not None
    try:
        return (moment.replace(tzinfo=None) - offset).replace(tzinfo=UTC)
    except OverflowError:
        return None


def rfc3339(moment: datetime, timespec: str = "auto", zulu: bool = False) -> str:
    text = moment.isoformat(timespec=timespec)
    return text[:-6] + "Z" if zulu and text.endswith("+00:00") else text


TIMESPECS = st.sampled_from(["auto", "seconds", "milliseconds", "microseconds", "minutes"])
_TS_MAX_MS = _TS_MAX_S * 1000
#: `ts` inside its range in every form a device may send: RFC 3339 with an offset or `Z`, at
#: every precision; epoch seconds and milliseconds, integral or not.
in_range_ts = st.one_of(
    st.builds(rfc3339, in_range_datetimes, TIMESPECS),
    st.builds(
        rfc3339, in_range_datetimes.map(lambda d: d.astimezone(UTC)), TIMESPECS, st.just(True)
    ),
    st.integers(0, EPOCH_MS_THRESHOLD - 1),
    st.integers(EPOCH_MS_THRESHOLD, _TS_MAX_MS),
    st.floats(0, _TS_MAX_MS),
)
#: `ts` outside its range, near or far: before 1970 or after 9999-12-30 as text with `Z` or
#: `+00:00`, and epoch numbers below 0 or past the end.
out_of_range_ts = st.one_of(
    st.builds(
        rfc3339,
        st.datetimes(max_value=datetime(1969, 12, 31, 23, 59, 59, 999999), timezones=st.just(UTC))
        | st.datetimes(min_value=datetime(9999, 12, 30, 0, 0, 1), timezones=st.just(UTC)),
        st.sampled_from(["auto", "seconds", "microseconds"]),
        st.booleans(),
    ),
    st.integers(max_value=-1) | st.integers(min_value=_TS_MAX_MS + 1),
    st.floats(max_value=-5e-324, allow_infinity=False)
    | st.floats(min_value=_TS_MAX_MS + 1, allow_infinity=False),
)
timestamp_texts = (
    st.builds(rfc3339, aware_datetimes | edge_datetimes(), TIMESPECS, st.booleans())
    | st.datetimes().map(datetime.isoformat)  # no offset
    | any_text
)
epoch_numbers = integers | finite_floats
#: Any `ts` but null: in its range (as often as not), at and beyond its ends, text that is no
#: time, booleans.
timestamps = in_range_ts | out_of_range_ts | timestamp_texts | epoch_numbers | st.booleans()

# ---- payloads -----------------------------------------------------------------------------

scalars = st.none() | st.booleans() | integers | finite_floats | any_text
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(metric_names, children, max_size=3)
    ),
    max_leaves=12,
)
#: Fields a heartbeat may have, each with a value of any type (usually of its own type).
payload_fields = st.fixed_dictionaries(
    {},
    optional={
        "ts": timestamps | json_values,
        "seq": integers | json_values,
        "msg_id": st.from_regex(r"[\x21-\x7e]{1,128}", fullmatch=True) | any_text | json_values,
        "metrics": st.dictionaries(metric_names, scalars | json_values, max_size=6) | json_values,
    },
)
flat_metrics = st.dictionaries(metric_names, scalars, max_size=6)


def _as_json(pairs: list[tuple[str, Any]], ascii_only: bool) -> bytes:
    """A JSON object with exactly these pairs (duplicates kept). ensure_ascii escapes a lone
    surrogate as `\\ud800`; without it, its UTF-8 form (which is not UTF-8) is sent as is."""

    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=ascii_only)

    text = "{" + ", ".join(f"{dump(k)}: {dump(v)}" for k, v in pairs) + "}"
    return text.encode("utf-8", "surrogatepass")


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """A heartbeat body: mostly a JSON object of known fields and metrics of every type,
    sometimes with a duplicate key, NaN, or text that is not UTF-8; sometimes any JSON."""
    shape = draw(st.sampled_from(["object", "object", "object", "any json", "bytes"]))
    if shape == "bytes":
        return draw(st.binary(max_size=256))
    if shape == "any json":
        return json.dumps(draw(json_values)).encode()
    fields = draw(payload_fields)
    pairs = list(fields.items()) + list(draw(flat_metrics).items())
    if pairs and draw(st.integers(0, 9)) == 0:
        pairs.append(draw(st.sampled_from(pairs)))  # a duplicate key
    if draw(st.integers(0, 19)) == 0:
        pairs.append(("nan", math.nan))  # json.dumps writes NaN
    return _as_json(pairs, ascii_only=draw(st.integers(0, 4)) > 0)


@st.composite
def valid_payloads(draw: st.DrawFn) -> dict[str, Any]:
    """A heartbeat that must be accepted, with every field at any point of its whole range: ts
    as text in any zone or as epoch seconds or milliseconds, seq up to 2^63-1, metrics of every
    type at their extremes (floats at +-max, subnormal, -0.0; text of any category but NUL and
    lone surrogates, which are refused)."""
    ts = draw(st.none() | in_range_ts)
    value = (
        st.booleans()
        | st.integers(-MAX_INT, MAX_INT)
        | st.sampled_from([n for n in INTEGER_EDGES if n <= MAX_INT]).map(lambda n: n * -1)
        | finite_floats
        | st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=256)
    )
    metrics = draw(st.dictionaries(valid_metric_names, value, max_size=8))
    body: dict[str, Any] = {
        "ts": ts,
        "seq": draw(st.none() | st.integers(0, MAX_INT)),
        "msg_id": draw(st.none() | st.from_regex(r"[\x21-\x7e]{1,128}", fullmatch=True)),
    }
    if draw(st.booleans()):
        body["metrics"] = metrics
    else:
        body.update(metrics)
    return body


# ---- topics -------------------------------------------------------------------------------

_levels = st.sampled_from(["devices", "", "#", "*", "+", "heartbeat", "status", "commands"])
#: Valid keys: every kind, heartbeats most, any valid id.
valid_routing_keys = st.one_of(
    st.builds(lambda d, k: f"devices.{d}.{k}", valid_device_ids, st.sampled_from(TopicKind)),
    st.builds(lambda d: f"devices.{d}.heartbeat", valid_device_ids),
)
hostile_routing_keys = st.one_of(
    # A valid id with an unknown, empty or wildcard kind, or extra or missing levels.
    st.builds(
        lambda d, rest: ".".join(["devices", d, *rest]),
        valid_device_ids,
        st.lists(_levels | any_text, max_size=3),
    ),
    # Ids that are not valid: any text (dots and slashes split levels), wildcards, too long.
    st.builds(
        lambda d, k: f"devices.{d}.{k}",
        any_text | st.sampled_from(["", "#", "+", "*", "a/b", "x" * 65, "ü", "a\x00"]),
        st.sampled_from(TopicKind),
    ),
    # Levels of anything, and bytes that are not UTF-8 as the broker's frames decode them.
    st.lists(_levels | any_text, max_size=6).map(".".join),
    st.binary(max_size=40).map(lambda raw: raw.decode("utf-8", "surrogateescape")),
)
#: Routing keys as the bridge meets them: valid most of the time (three in five), so that the
#: payload behind them is explored, and every way of being invalid the rest of the time.
routing_keys = st.integers(0, 4).flatmap(
    lambda n: valid_routing_keys if n < 3 else hostile_routing_keys
)

# ---- AMQP headers -------------------------------------------------------------------------

#: Values of every type an AMQP field table decodes to (and a few no decoder makes).
header_values = st.recursive(
    st.none()
    | st.booleans()
    | integers
    | finite_floats
    | st.floats()
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.datetimes(timezones=st.none() | st.just(UTC))
    | any_text
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(any_text, children, max_size=3)
    ),
    max_leaves=8,
)
DEAD_LETTER_FIELDS = [
    "id",
    "reason",
    "detail",
    "source",
    "device-id",
    "topic",
    "received-at",
    "size",
]
dead_letter_headers = st.dictionaries(
    st.sampled_from(DEAD_LETTER_FIELDS).map(lambda f: f"x-gateway-{f}") | any_text,
    header_values
    | st.sampled_from(["not_json", "mqtt", "http", "work_queue", "2026-11-29T10:00:00Z"])
    | st.uuids().map(str),
    max_size=10,
)


def valid_dead_letter_headers(size: int) -> dict[str, Any]:
    return {
        "x-gateway-id": "0b9f4f0e-1f7c-4c1e-9a57-8d3f5d9c2a11",
        "x-gateway-reason": "not_json",
        "x-gateway-detail": "payload is not JSON",
        "x-gateway-source": "mqtt",
        "x-gateway-received-at": "2026-11-29T10:00:00Z",
        "x-gateway-size": size,
    }


# ---- the regression corpus ----------------------------------------------------------------


def corpus(name: str) -> list[dict[str, Any]]:
    """Entries of `tests/corpus/<name>.json`: inputs that once broke something, and what."""
    return json.loads((CORPUS / f"{name}.json").read_text())


def corpus_bytes(entry: dict[str, Any], field: str = "body") -> bytes:
    """An entry's bytes: `<field>` as UTF-8 text, `<field>_base64` when it is not text, or
    `<field>_repeat` (`[text, count]`) when it is long."""
    if f"{field}_repeat" in entry:
        text, count = entry[f"{field}_repeat"]
        return (text * count).encode("utf-8")
    if f"{field}_base64" in entry:
        return base64.b64decode(entry[f"{field}_base64"])
    return entry[field].encode("utf-8", "surrogatepass")


def corpus_headers(entry: dict[str, Any], *, to_send: bool = False) -> dict[str, Any]:
    """An entry's AMQP headers as the worker receives them. `{"$bytes": "<base64>"}` is a long
    string that is not UTF-8 (received as bytes; `to_send`, as the surrogate escapes that the
    `raw_strings` fixture sends as those bytes), `{"$int": "<digits>"}` an integer JSON cannot
    carry exactly."""

    def value(v: Any) -> Any:
        if isinstance(v, dict) and set(v) == {"$bytes"}:
            raw = base64.b64decode(v["$bytes"])
            return raw.decode("utf-8", "surrogateescape") if to_send else raw
        if isinstance(v, dict) and set(v) == {"$int"}:
            return int(v["$int"])
        return v

    return {k: value(v) for k, v in entry.get("headers", {}).items()}


# ---- a stream for the end-to-end test -----------------------------------------------------

#: Bodies the issue's table names, and the shapes the property tests explore, as literals.
ISSUE_BODIES = [
    b'{"ts":"0001-01-01T00:00:00+01:00"}',
    b'{"ts":"9999-12-31T23:59:59-01:00"}',
    b'{"big": 1e308}',
]


def hostile_stream(rng: random.Random, count: int) -> list[bytes]:
    """`count` hostile heartbeat bodies: the issue's, the corpus', then generated ones (every
    kind of value the property tests draw from, picked by a seeded generator)."""
    bodies = [*ISSUE_BODIES, *(corpus_bytes(e) for e in corpus("payloads"))]
    edges = [
        *INTEGER_EDGES,
        *(-n for n in INTEGER_EDGES),
        *FLOAT_EDGES,
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+23:59",
        "9999-12-31T23:59:59.999999-23:59",
        "9999-12-30T00:00:00.000001Z",
        "1969-12-31T23:59:59Z",
        "2026-11-29T10:00:00",
        "2026-02-30T10:00:00Z",
        *SPECIAL_CHARACTERS,
        "x" * 300,
        True,
        None,
        [],
        {},
    ]
    fields = ["ts", "seq", "msg_id", "metrics", "cpu", "big", "", "\ud800", "x" * 65, "a\x00"]
    while len(bodies) < count:
        pairs = [(rng.choice(fields), rng.choice(edges)) for _ in range(rng.randint(1, 4))]
        body = _as_json(pairs, ascii_only=rng.random() < 0.8)
        if rng.random() < 0.1:
            body = body[: rng.randint(0, len(body))]  # cut short
        bodies.append(body)
    return bodies[:count]


# ---- a raw MQTT client --------------------------------------------------------------------


class RawMqtt:
    """An MQTT 3.1.1 client on a bare socket, for what paho refuses to send: topics that are
    not UTF-8, hold NUL or wildcards, or are empty. One QoS 1 publish at a time."""

    def __init__(
        self,
        port: int,
        username: str,
        password: str,
        timeout: float = 5.0,
        client_id: str | None = None,
    ) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        connect = _mqtt_string(b"MQTT") + bytes([4, 0xC2]) + struct.pack(">H", 30)
        client = username if client_id is None else client_id  # client id = device id
        connect += _mqtt_string(client.encode("utf-8", "surrogateescape"))
        connect += _mqtt_string(username.encode("utf-8", "surrogateescape"))
        connect += _mqtt_string(password.encode())
        self._send(0x10, connect)
        #: The broker's CONNACK (4 bytes), or less when it closed the connection instead.
        self.connack = self._receive(4)
        self.connected = self.connack == b"\x20\x02\x00\x00"  # accepted
        self._packet_id = 0

    def publish(self, topic: bytes, payload: bytes) -> bool:
        """True once the broker acknowledged the message (PUBACK); False when it closed the
        connection or did not answer."""
        self._packet_id += 1
        packet = _mqtt_string(topic) + struct.pack(">H", self._packet_id) + payload
        try:
            self._send(0x32, packet)
            return self._receive(4) == b"\x40\x02" + struct.pack(">H", self._packet_id)
        except OSError:
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send(0xE0, b"")
        self._sock.close()

    def _send(self, kind: int, body: bytes) -> None:
        size, length = len(body), bytearray()
        while True:
            digit, size = size % 128, size // 128
            length.append(digit | (0x80 if size else 0))
            if not size:
                break
        self._sock.sendall(bytes([kind]) + bytes(length) + body)

    def _receive(self, count: int) -> bytes:
        """Up to `count` bytes: fewer when the broker closed the connection."""
        data = b""
        try:
            while len(data) < count:
                chunk = self._sock.recv(count - len(data))
                if not chunk:
                    return data
                data += chunk
        except OSError:
            return data
        return data


def _mqtt_string(raw: bytes) -> bytes:
    return struct.pack(">H", len(raw)) + raw
