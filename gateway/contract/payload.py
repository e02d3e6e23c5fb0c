"""The heartbeat payload devices send over MQTT and HTTP, and its parser.

A payload is a JSON object of at most 16 KiB; every field is optional and an empty body is a
valid (liveness only) heartbeat. `ts`, `seq` and `msg_id` are known fields, metrics come nested
under `metrics` or as any other top-level key. Every way a payload can be wrong raises
`InputError` with a reason code and a message that names the problem; nothing else escapes.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictInt,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.contract.reasons import InputError, Reason

MAX_PAYLOAD_BYTES = 16 * 1024
MAX_METRICS = 128
MAX_METRIC_STRING = 256
MAX_DEPTH = 4
#: Integers a metric or `seq` may hold: PostgreSQL's bigint.
MAX_INT = 2**63 - 1
#: Epoch values at or above this are milliseconds (1e11 s is the year 5138).
EPOCH_MS_THRESHOLD = 100_000_000_000
#: The times `ts` may name, both included. Inside them, every time is a Python datetime and a
#: PostgreSQL timestamptz in UTC and in any session time zone (Python stops at the year 9999,
#: and a time zone ahead of UTC moves 9999-12-31 past it); a device clock that reads earlier
#: than 1970 is not set.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TS_MIN = EPOCH
TS_MAX = datetime(9999, 12, 30, tzinfo=UTC)
TS_RANGE = f"{TS_MIN:%Y-%m-%dT%H:%M:%SZ} to {TS_MAX:%Y-%m-%dT%H:%M:%SZ}"
_TS_MAX_MS = int(TS_MAX.timestamp()) * 1000

#: A time in `TS_MIN`..`TS_MAX` with its UTC offset: what the canonical messages carry.
Timestamp = Annotated[AwareDatetime, Field(ge=TS_MIN, le=TS_MAX)]

RESERVED_FIELDS = frozenset({"ts", "seq", "msg_id", "metrics"})
METRIC_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
METRIC_NAME_RE = re.compile(METRIC_NAME_PATTERN[1:-1])


def _metric_value(value: Any) -> bool | int | float | str:
    """A metric is a finite number (64-bit when integral), a boolean or a short string."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -MAX_INT <= value <= MAX_INT:
            raise ValueError("integer is out of the 64-bit range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("number must be finite")
        return value
    if isinstance(value, str):
        if len(value) > MAX_METRIC_STRING:
            raise ValueError(f"text is longer than {MAX_METRIC_STRING} characters")
        if "\x00" in value:
            raise ValueError("text must not contain NUL characters")
        return value
    kind = {type(None): "null", dict: "an object", list: "an array"}.get(type(value), "other")
    raise ValueError(f"must be a number, boolean or short string, not {kind}")


MetricValue = Annotated[
    bool | int | float | str,
    PlainValidator(_metric_value, json_schema_input_type=bool | int | float | str),
]


def _stored_metric_value(value: Any) -> bool | int | float | str:
    """A metric as PostgreSQL returns it. jsonb keeps numbers as decimals, so a float written
    with a positive exponent comes back whole (`1e+19` as `10000000000000000000`): an integer
    outside the 64-bit range, which input refuses, was such a float."""
    if type(value) is int and not -MAX_INT <= value <= MAX_INT:
        return float(value)
    return _metric_value(value)


#: A metric read back from storage (device state, history): see `_stored_metric_value`.
StoredMetricValue = Annotated[
    bool | int | float | str,
    PlainValidator(_stored_metric_value, json_schema_input_type=bool | int | float | str),
]
MsgId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]


class HeartbeatPayload(BaseModel):
    """What a device sent, validated; transport details live in `gateway.contract.messages`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ts: datetime | None = None
    seq: Annotated[StrictInt, Field(ge=0, le=MAX_INT)] | None = None
    msg_id: MsgId | None = None
    metrics: dict[str, MetricValue] = Field(default_factory=dict, max_length=MAX_METRICS)

    @model_validator(mode="before")
    @classmethod
    def _collect_flat_metrics(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        metrics = data.get("metrics")
        if metrics is None:
            metrics = {}
        elif not isinstance(metrics, dict):
            raise ValueError("'metrics' must be an object of name: value")
        flat = {k: v for k, v in data.items() if k not in RESERVED_FIELDS}
        clash = sorted(flat.keys() & metrics.keys())
        if clash:
            raise ValueError(f"metric {clash[0]!r} is given both at top level and in 'metrics'")
        known = {k: data[k] for k in RESERVED_FIELDS - {"metrics"} if data.get(k) is not None}
        return {**known, "metrics": {**metrics, **flat}}

    @field_validator("ts", mode="before")
    @classmethod
    def _parse_ts(cls, value: Any) -> datetime | None:
        return parse_timestamp(value) if value is not None else None

    @field_validator("metrics", mode="before")
    @classmethod
    def _check_metric_names(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name in value:
                if not METRIC_NAME_RE.fullmatch(name):
                    raise ValueError(
                        f"metric name {name[:80]!r} is invalid: use 1-64 characters of "
                        "A-Z, a-z, 0-9, '_', '.', ':' and '-'"
                    )
        return value


def wire_schema() -> dict[str, Any]:
    """The JSON schema of a payload as devices send it (the model's own schema describes it
    once parsed): `ts` as RFC 3339 text or epoch seconds or milliseconds, metrics nested under
    `metrics` or as any other top-level key. What no schema says (the ts range, no duplicate
    keys, at most 16 KiB, nesting) is checked by `parse_payload`, which names the problem."""
    metric = {
        "anyOf": [
            {"type": "boolean"},
            {"type": "integer", "minimum": -MAX_INT, "maximum": MAX_INT},
            {"type": "number"},
            {"type": "string", "maxLength": MAX_METRIC_STRING},
        ]
    }
    schema = HeartbeatPayload.model_json_schema()
    fields = schema["properties"]
    fields["ts"] = {
        "anyOf": [
            {"type": "string", "format": "date-time"},
            {"type": "number", "minimum": 0, "maximum": _TS_MAX_MS},
            {"type": "null"},
        ],
        "default": None,
        "title": "Ts",
        "description": f"RFC 3339 with an offset, or epoch seconds (milliseconds from "
        f"{EPOCH_MS_THRESHOLD}); from {TS_RANGE}",
    }
    fields["metrics"] = {
        "type": "object",
        "maxProperties": MAX_METRICS,
        "propertyNames": {"pattern": METRIC_NAME_PATTERN},
        "additionalProperties": metric,
    }
    schema["additionalProperties"] = metric  # a metric at the top level
    schema["propertyNames"] = {"pattern": METRIC_NAME_PATTERN}
    schema["description"] = "A heartbeat; every field is optional, an empty body too."
    return schema


def parse_timestamp(value: Any) -> datetime:
    """RFC 3339 text, or epoch seconds or milliseconds, as an aware UTC datetime within
    `TS_MIN`..`TS_MAX`; anything else is a ValueError that names `ts`."""
    if isinstance(value, bool):
        raise ValueError("ts must be RFC 3339 text or epoch seconds/milliseconds, not a boolean")
    if isinstance(value, int | float):
        # Compared before any arithmetic: an integer of 400 digits fits no float.
        if not 0 <= value <= _TS_MAX_MS:
            raise _out_of_range(value)
        # A timedelta keeps an integer exact (value / 1000 as a float would not).
        in_ms = value >= EPOCH_MS_THRESHOLD
        parsed = EPOCH + (timedelta(milliseconds=value) if in_ms else timedelta(seconds=value))
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"ts {value[:64]!r} is not RFC 3339 (e.g. 2026-11-29T10:00:00Z)"
            ) from None
        if parsed.tzinfo is None:
            raise ValueError(f"ts {value[:64]!r} has no UTC offset (add Z or +hh:mm)")
        try:  # 0001-01-01T00:00:00+01:00 is a datetime, but its UTC time is not
            parsed = parsed.astimezone(UTC)
        except OverflowError:
            raise _out_of_range(value) from None
    else:
        raise ValueError("ts must be RFC 3339 text or epoch seconds/milliseconds")
    if not TS_MIN <= parsed <= TS_MAX:
        raise _out_of_range(value)
    return parsed


def _out_of_range(value: int | float | str) -> ValueError:
    if isinstance(value, str):
        shown = repr(value[:64])
    elif isinstance(value, float):
        shown = f"{value:.15g}"
    elif abs(value) < 10**30:
        shown = str(value)
    else:  # as a float it would overflow, and as text be too long to read
        shown = f"(an integer of {value.bit_length()} bits)"
    return ValueError(f"ts {shown} is out of range: use a time from {TS_RANGE}")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InputError(Reason.DUPLICATE_KEY, f"key {key[:64]!r} appears more than once")
            seen.add(key)
    return obj


def _refuse_constant(name: str) -> Any:
    raise InputError(Reason.NON_FINITE_NUMBER, f"{name} is not a valid number; send a finite value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InputError(
            Reason.NON_FINITE_NUMBER, f"number {text[:32]} is too large to be a finite value"
        )
    return value


#: Built once (`json.loads` with hooks builds a decoder per call).
_STRICT_JSON = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates,
    parse_constant=_refuse_constant,
    parse_float=_finite_float,
)


def decode_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys, bounded nesting (the caller has
    checked the size)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(Reason.NOT_UTF8, f"payload is not UTF-8 (byte {exc.start})") from None
    if text.startswith("\ufeff"):
        raise InputError(Reason.NOT_JSON, "payload is not JSON: it starts with a UTF-8 BOM")
    try:
        return _STRICT_JSON.decode(text)
    except InputError:
        raise
    except RecursionError:
        raise InputError(Reason.TOO_DEEP, "payload is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise InputError(
            Reason.NOT_JSON,
            f"payload is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise InputError(Reason.NOT_JSON, f"payload is not usable JSON: {exc}") from None


def parse_payload(raw: bytes) -> HeartbeatPayload:
    """Parse a heartbeat body. Raises `InputError` (never anything else) when it is invalid."""
    if len(raw) > MAX_PAYLOAD_BYTES:  # first: 70 KB of blanks is not an empty heartbeat
        raise InputError(
            Reason.TOO_LARGE, f"payload is {len(raw)} bytes; the limit is {MAX_PAYLOAD_BYTES}"
        )
    if not raw.strip():
        return HeartbeatPayload()
    data = decode_json(raw)
    if not isinstance(data, dict):
        raise InputError(
            Reason.NOT_AN_OBJECT, f"payload must be a JSON object, not {_json_type(data)}"
        )
    if _depth(data, MAX_DEPTH) > MAX_DEPTH:
        raise InputError(Reason.TOO_DEEP, f"payload is nested deeper than {MAX_DEPTH} levels")
    surrogate = _lone_surrogate(data) if b"\\u" in raw else None  # only an escape makes one
    if surrogate is not None:
        raise InputError(
            Reason.NOT_UTF8,
            f"payload escapes a lone surrogate (\\u{ord(surrogate):04x}), which is not a "
            "character; send UTF-8 text, or pair it",
        )
    try:
        return HeartbeatPayload.model_validate(data)
    except ValidationError as exc:
        raise InputError(Reason.INVALID_FIELD, describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad field, e.g. `seq: must be >= 0`."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        loc = ".".join(str(part) for part in error["loc"] if not _is_type_tag(part))
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{loc}: {message}" if loc else message)
    return "; ".join(dict.fromkeys(problems))


def _is_type_tag(part: Any) -> bool:
    # Pydantic names union members in error locations (`metrics.cpu.float`); users don't care.
    return isinstance(part, str) and part in {"bool", "int", "float", "str", "constrained-str"}


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: Any) -> str | None:
    """The first unpaired surrogate in any string or key of `value` (JSON's `\\ud800` escapes
    decode to one; no UTF-8 text, PostgreSQL's `jsonb` or a JSON encoder takes it), else None."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        return found.group() if found else None
    if isinstance(value, dict):
        items = (x for pair in value.items() for x in pair)
    elif isinstance(value, list):
        items = iter(value)
    else:
        return None
    for item in items:
        found = _lone_surrogate(item)
        if found is not None:
            return found
    return None


def _depth(value: Any, limit: int) -> int:
    """How deep `value` nests (a scalar is 1, `{"a": 1}` is 2), counted no further than past
    `limit`: a loop, not recursion, so no nesting the JSON decoder accepts can overflow it."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= limit:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((child, level + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, level + 1) for child in item)
    return deepest


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
