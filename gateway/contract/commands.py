"""Commands to devices: what an operator asks, what a device receives, what it replies.

The contract (README, "Commands to devices"):

- an operator asks `{"name", "args", "ttl_s"}`; the command is stored `pending` with its
  `expires_at`;
- a device receives `{"id", "name", "args", "expires_at"}` on `devices/<id>/commands` (QoS 1)
  or in the answer to an HTTP request; it may get one more than once and drops repeats by id;
- a device replies `{"id": "<command id>", "status": "succeeded" | "failed", "result": {...}}`
  on `devices/<id>/replies` or over HTTP.

Lifecycle: `pending` -> `sent` -> `succeeded` | `failed` | `expired`, and `cancelled` from
`pending`. `expired` is reached from `pending` or `sent` once `expires_at` passes without a
reply. The statuses only ever move forward (`gateway.storage.command_store` changes them with
conditional updates).

Everything a device sends is converted by `parse_reply`, a total function: a reply or an
`InputError` with its reason.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    StringConstraints,
    ValidationError,
)

from gateway.contract.messages import Source, Timestamp, utcnow
from gateway.contract.payload import MAX_DEPTH, MAX_PAYLOAD_BYTES, _depth, decode_json
from gateway.contract.reasons import InputError, Reason, unforeseen

#: Longest and default time to live of a command.
MAX_TTL_S = 7 * 24 * 3600
DEFAULT_TTL_S = 600
#: A command's arguments and a reply's result, encoded: at most this many bytes each.
MAX_ARGS_BYTES = 8 * 1024
NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
#: What the gateway sends when an operator changes a device's heartbeat interval.
SET_HEARTBEAT_INTERVAL = "set_heartbeat_interval"
#: How long that command stays live.
SET_INTERVAL_TTL_S = 3600


class CommandStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


#: Statuses a command is live in: it may still reach its device.
LIVE = (CommandStatus.PENDING, CommandStatus.SENT)
#: Statuses a device's reply may move a command to.
REPLY_STATUSES = (CommandStatus.SUCCEEDED, CommandStatus.FAILED)


def _bounded_object(value: dict[str, Any], what: str) -> dict[str, Any]:
    if _depth(value, MAX_DEPTH + 1) > MAX_DEPTH:
        raise ValueError(f"{what} is nested deeper than {MAX_DEPTH} levels")
    try:
        size = len(orjson.dumps(value))
    except orjson.JSONEncodeError as exc:  # e.g. an integer beyond 64 bits
        raise ValueError(f"{what} cannot be stored: {exc}") from None
    if size > MAX_ARGS_BYTES:
        raise ValueError(f"{what} is {size} bytes encoded; the limit is {MAX_ARGS_BYTES}")
    if _holds_nul(value):  # JSON takes \u0000; PostgreSQL's jsonb refuses it
        raise ValueError(f"{what} cannot be stored: a key or a string holds NUL (\\u0000)")
    return value


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in key or _holds_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


class CommandRequest(BaseModel):
    """What an operator asks for (`POST /devices/{id}/commands`)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
    args: dict[str, Any] = Field(default_factory=dict)
    ttl_s: int = Field(default=DEFAULT_TTL_S, ge=1, le=MAX_TTL_S)

    def model_post_init(self, _context: Any) -> None:
        _bounded_object(self.args, "args")


class Command(BaseModel):
    """A stored command, as operators see it."""

    id: uuid.UUID
    device_id: str
    name: str
    args: dict[str, Any]
    status: CommandStatus
    created_at: datetime
    expires_at: datetime
    sent_at: datetime | None = None
    finished_at: datetime | None = None
    result: dict[str, Any] | None = None
    #: How the device got it first: `mqtt` or `http` (null while pending).
    sent_via: str | None = None

    def wire(self) -> CommandMessage:
        return CommandMessage(
            id=self.id, name=self.name, args=self.args, expires_at=self.expires_at
        )


class CommandMessage(BaseModel):
    """What a device receives: on `devices/<id>/commands`, or in an HTTP answer."""

    id: uuid.UUID
    name: str
    args: dict[str, Any]
    expires_at: datetime

    def encode(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


class ReplyPayload(BaseModel):
    """A device's reply, as it sends it."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr
    status: CommandStatus
    result: dict[str, Any] = Field(default_factory=dict)


class CommandReply(BaseModel):
    """A device's reply, converted: what the bridge and the api hand the worker."""

    model_config = ConfigDict(frozen=True)

    #: This copy's id: a dead letter made of it has an id derived from it (stored once).
    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    command_id: uuid.UUID
    device_id: str
    status: CommandStatus
    result: dict[str, Any]
    source: Source
    received_at: Timestamp = Field(default_factory=utcnow)

    def encode(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def decode(cls, body: bytes) -> CommandReply:
        return cls.model_validate_json(body)


def parse_reply(
    device_id: str, raw: bytes, source: Source, received_at: datetime | None = None
) -> CommandReply:
    """A reply body of device `device_id`, converted. Raises `InputError` and nothing else."""
    try:
        return _parse_reply(device_id, raw, source, received_at or utcnow())
    except InputError:
        raise
    except Exception as exc:
        raise unforeseen(exc, f"a command reply over {source}") from exc


def _parse_reply(device_id: str, raw: bytes, source: Source, received_at: datetime) -> CommandReply:
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise InputError(
            Reason.TOO_LARGE, f"reply is {len(raw)} bytes; the limit is {MAX_PAYLOAD_BYTES}"
        )
    document = decode_json(raw)
    if not isinstance(document, dict):
        raise InputError(Reason.NOT_AN_OBJECT, "a reply is a JSON object {id, status, result}")
    try:
        payload = ReplyPayload.model_validate(document)
        _bounded_object(payload.result, "result")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "reply"
        raise InputError(Reason.INVALID_FIELD, f"{where}: {first.get('msg')}") from None
    except ValueError as exc:
        raise InputError(Reason.INVALID_FIELD, str(exc)) from None
    if payload.status not in REPLY_STATUSES:
        raise InputError(
            Reason.INVALID_FIELD, "status: a reply's status is 'succeeded' or 'failed'"
        )
    try:
        command_id = uuid.UUID(payload.id)
    except ValueError:
        raise InputError(
            Reason.UNKNOWN_COMMAND, f"id: {payload.id[:80]!r} is no command's id"
        ) from None
    return CommandReply(
        command_id=command_id,
        device_id=device_id,
        status=payload.status,
        result=payload.result,
        source=source,
        received_at=received_at,
    )


def expiry(ttl_s: int, now: datetime | None = None) -> datetime:
    return (now or utcnow()) + timedelta(seconds=ttl_s)


def set_heartbeat_interval(device: Any) -> CommandRequest:
    """The command that tells a device its new heartbeat interval (an operator changed it):
    its status says whether the device took it."""
    return CommandRequest(
        name=SET_HEARTBEAT_INTERVAL,
        args={"heartbeat_interval_s": device.heartbeat_interval_s},
        ttl_s=SET_INTERVAL_TTL_S,
    )
