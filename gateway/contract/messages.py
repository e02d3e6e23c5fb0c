"""Canonical messages on the work queue, and dead letters.

The bridge (MQTT) and the api (HTTP) turn what devices send into exactly these models; the
worker consumes nothing else. Serialized as JSON: one per AMQP message, or several in a
`WorkBatch` (what the bridge and the api send under load).
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from gateway.contract.payload import (
    MAX_INT,
    HeartbeatPayload,
    MetricValue,
    Timestamp,
    describe_validation_error,
)
from gateway.contract.reasons import InputError, Reason, storable_text, unforeseen
from gateway.contract.topics import DeviceId

#: A heartbeat repeated within this many days before the day it is stored (the same device and
#: `msg_id`) is stored once; 0: whatever its age. The worker looks its ids up in these days'
#: partitions (`gateway.storage.partitions`).
DEDUP_WINDOW_DAYS = 2
#: Namespace of message ids derived from (device_id, msg_id).
MESSAGE_NAMESPACE = uuid.UUID("6f1d3c1e-3a5b-4d0e-9c1e-2b7a9e5d4c10")
CONTENT_TYPE = "application/json"


class Source(StrEnum):
    MQTT = "mqtt"
    HTTP = "http"
    #: Found on the work queue itself (not from a device).
    WORK_QUEUE = "work_queue"


class DeviceStatus(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    NEVER_SEEN = "never_seen"


def utcnow() -> datetime:
    return datetime.now(UTC)


def idempotency_key(payload: HeartbeatPayload) -> str:
    """The key that makes a retried heartbeat land once.

    The device's `msg_id` when it sent one; otherwise `seq` together with `ts` (a device's clock
    and counter name one heartbeat); otherwise a fresh random key, so such heartbeats are stored
    at least once (send `msg_id` for exactly once across device retries).
    """
    if payload.msg_id is not None:
        return payload.msg_id
    if payload.seq is not None and payload.ts is not None:
        return f"seq:{payload.seq}@{payload.ts.isoformat()}"
    return f"rnd:{random.getrandbits(128):032x}"  # unique, not secret: no system call


class Heartbeat(BaseModel):
    """One normalized heartbeat: what the worker stores."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["heartbeat"] = "heartbeat"
    id: uuid.UUID
    device_id: DeviceId
    msg_id: str = Field(min_length=1, max_length=160)
    seq: Annotated[int, Field(ge=0, le=MAX_INT)] | None = None
    device_ts: Timestamp | None = None
    received_at: Timestamp
    source: Source
    metrics: dict[str, MetricValue] = Field(default_factory=dict)

    @classmethod
    def from_payload(
        cls,
        device_id: str,
        payload: HeartbeatPayload,
        source: Source,
        received_at: datetime | None = None,
    ) -> Heartbeat:
        msg_id = idempotency_key(payload)
        return cls(
            id=uuid.uuid5(MESSAGE_NAMESPACE, f"{device_id}/{msg_id}"),
            device_id=device_id,
            msg_id=msg_id,
            seq=payload.seq,
            device_ts=payload.ts,
            received_at=received_at or utcnow(),
            source=source,
            metrics=payload.metrics,
        )


class StatusReport(BaseModel):
    """A device's own word on its status: `online`, or `offline` (usually its Last Will)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["status"] = "status"
    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    device_id: DeviceId
    status: Literal[DeviceStatus.ONLINE, DeviceStatus.OFFLINE]
    received_at: Timestamp = Field(default_factory=utcnow)
    source: Source

    @classmethod
    def from_payload(
        cls, device_id: str, raw: bytes, source: Source, received_at: datetime | None = None
    ) -> StatusReport:
        text = raw.strip().decode("utf-8", "replace").strip('"').lower()
        if text not in (DeviceStatus.ONLINE, DeviceStatus.OFFLINE):
            raise InputError(
                Reason.INVALID_STATUS,
                f"status payload must be 'online' or 'offline', not {text[:32]!r}",
            )
        return cls(
            device_id=device_id,
            status=DeviceStatus(text),
            source=source,
            received_at=received_at or utcnow(),
        )


Canonical = Annotated[Heartbeat | StatusReport, Field(discriminator="kind")]
CANONICAL = TypeAdapter(Canonical)

#: Canonical messages in one AMQP message: each crossing of the broker costs the same however
#: many it carries. Acked as one, once every item is stored (or dead-lettered).
MAX_BATCH_ITEMS = 1000


class WorkBatch(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["batch"] = "batch"
    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    items: list[Canonical] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)


WorkMessage = Annotated[Heartbeat | StatusReport | WorkBatch, Field(discriminator="kind")]
WORK_MESSAGE = TypeAdapter(WorkMessage)


def to_json(value: Any) -> bytes:
    """JSON of canonical messages (or lists of them): orjson over the models' validated fields,
    a tenth of the cost of pydantic's own dump per heartbeat (none of these models customizes
    how it is serialized)."""
    return orjson.dumps(value, default=_fields)


def _fields(value: Any) -> dict[str, Any]:
    if isinstance(value, BaseModel):
        return value.__dict__
    raise TypeError(f"{type(value).__name__} is not a canonical message")


def encode_work(message: Heartbeat | StatusReport | WorkBatch) -> bytes:
    """The body of a work message, as `decode_work` reads it back."""
    return to_json(message)


def decode_work(body: bytes) -> list[Heartbeat | StatusReport]:
    """The canonical messages in a work-queue body: one, or a batch's items."""
    message = WORK_MESSAGE.validate_json(body)
    return list(message.items) if isinstance(message, WorkBatch) else [message]


def read_work(body: bytes) -> tuple[list[Heartbeat | StatusReport], list[Rejection]]:
    """What the worker makes of a work-queue body, whatever its bytes: the canonical messages
    it carries, and a dead letter for each part that is not one. Never raises.

    A batch that does not validate as a whole is read item by item: it carries the messages
    of many devices, and one item that is not canonical (say, from a bridge of another
    version) must not take the others with it."""
    try:
        return decode_work(body), []
    except Exception as exc:
        error = _refusal(exc)
    try:
        split = _read_items(body)
    except Exception:  # not even a batch's envelope: the body is one dead letter
        split = None
    if split is not None:
        return split
    return [], [Rejection.of(error, body, Source.WORK_QUEUE, device_id=_claimed_device(body))]


def _read_items(body: bytes) -> tuple[list[Heartbeat | StatusReport], list[Rejection]] | None:
    """A batch's items one by one, each bad one a dead letter of its own; None if `body` is
    not a batch's envelope (`{"kind": "batch", "items": [...]}`). Read by the standard
    library's parser, which takes any JSON (integers of any size, lone surrogates); each item
    is then validated from its own JSON, as any work message is."""
    envelope = json.loads(body)
    if not isinstance(envelope, dict) or envelope.get("kind") != "batch":
        return None
    items = envelope.get("items")
    if not isinstance(items, list) or not items:
        return None
    good: list[Heartbeat | StatusReport] = []
    bad: list[Rejection] = []
    for item in items:
        raw = json.dumps(item).encode()  # ASCII: a lone surrogate stays an escape
        try:
            good.append(CANONICAL.validate_json(raw))
        except Exception as exc:
            device_id = _claimed_device(item)
            bad.append(Rejection.of(_refusal(exc), raw, Source.WORK_QUEUE, device_id=device_id))
    return good, bad


def _refusal(exc: Exception, what: str = "a work message") -> InputError:
    if isinstance(exc, ValidationError):
        return InputError(Reason.INVALID_MESSAGE, describe_validation_error(exc))
    return unforeseen(exc, what)


def _claimed_device(value: bytes | Any) -> str | None:
    """The device a message that is not canonical names, if any (to find its dead letter by
    device): the `device_id` of a JSON object."""
    if isinstance(value, bytes):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:  # what orjson raises for any input it refuses
            return None
    claimed = value.get("device_id") if isinstance(value, dict) else None
    return claimed if isinstance(claimed, str) else None


#: Raw bytes kept with a dead letter; longer payloads are cut (their size is recorded).
MAX_REJECTED_BYTES = 64 * 1024


class Rejection(BaseModel):
    """Input that could not become a canonical message: a dead letter, with the reason."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    reason: Reason
    detail: str
    source: Source
    device_id: str | None = None
    topic: str | None = None
    received_at: Timestamp = Field(default_factory=utcnow)
    #: The payload's size before it was cut (a PostgreSQL integer).
    size: int = Field(ge=0, le=2**31 - 1)
    payload: bytes = Field(max_length=MAX_REJECTED_BYTES)

    @field_validator("detail", "device_id", "topic")
    @classmethod
    def _storable(cls, value: str | None) -> str | None:
        """Whatever text a dead letter carries is stored and shown: never a NUL or a lone
        surrogate (which PostgreSQL, JSON and AMQP's UTF-8 all refuse)."""
        return storable_text(value) if value is not None else None

    @classmethod
    def of(
        cls,
        error: InputError,
        raw: bytes,
        source: Source,
        *,
        device_id: str | None = None,
        topic: str | None = None,
        received_at: datetime | None = None,
    ) -> Rejection:
        return cls(
            reason=error.reason,
            detail=error.detail,
            source=source,
            device_id=device_id[:200] if device_id else None,
            topic=topic[:500] if topic else None,
            received_at=received_at or utcnow(),
            size=min(len(raw), 2**31 - 1),
            payload=raw[:MAX_REJECTED_BYTES],
        )

    def headers(self) -> dict[str, Any]:
        """AMQP headers for the dead letter; the raw payload travels as the body."""
        fields = self.model_dump(mode="json", exclude={"payload"}, exclude_none=True)
        return {f"x-gateway-{key.replace('_', '-')}": value for key, value in fields.items()}

    @classmethod
    def from_amqp(cls, headers: dict[str, Any], body: bytes) -> Rejection:
        """The dead letter `headers` describe (raises ValidationError if they do not)."""
        fields = {
            key.removeprefix("x-gateway-").replace("-", "_"): _text(value)
            for key, value in headers.items()
            if isinstance(key, str) and key.startswith("x-gateway-")
        }
        return cls.model_validate({**fields, "payload": body})


def read_dead_letter(headers: Any, body: bytes) -> Rejection:
    """What the worker makes of a message on the dead-letter queue, whatever its headers (of
    any type) and bytes: the dead letter they describe, or else a dead letter of its own
    (`invalid_message`, with the body, and the device its headers name). Never raises."""
    headers = headers if isinstance(headers, Mapping) else {}
    try:
        return Rejection.from_amqp(dict(headers), body)
    except Exception as exc:
        error = _refusal(exc, "a dead letter")
    claimed = headers.get("x-gateway-device-id")
    device_id = claimed if isinstance(claimed, str) else None
    return Rejection.of(error, body, Source.WORK_QUEUE, device_id=device_id)


def show_bytes(payload: bytes) -> str:
    """Raw bytes for people: the text when it is UTF-8, else `base64:...`."""
    payload = bytes(payload)
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(payload).decode()


def _text(value: Any) -> Any:
    """A header's value: AMQP long strings that are not UTF-8 arrive as bytes."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value
