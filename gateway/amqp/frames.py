"""AMQP frames from the broker, decoded whatever bytes they carry.

pamqp, under aio-pika, decodes a frame's short strings (routing keys, message properties) and
the names in header tables as UTF-8, and a timestamp property as a datetime; when one does not
decode, the whole frame fails. aiormq then closes the connection, and the broker delivers the
same message first again after every reconnect: one message would stop a consumer for good.
AMQP does not make those bytes UTF-8, and RabbitMQ's MQTT plugin passes the bytes of a topic
through as they came (`devices/<id>/\\xff`).

`install` replaces those decoders: bytes that are not UTF-8 keep their place as surrogate
escapes (`\\udcff`, as `os.fsdecode` does), so the message reaches the code that refuses it
with a dead letter; a timestamp no datetime holds reads as None. Valid input decodes exactly
as before, and a frame that is cut short still fails as before.
"""

from __future__ import annotations

import struct
from datetime import datetime
from typing import Any

from pamqp import decode

_LENGTH = struct.Struct(">I")
_pamqp_timestamp = decode.timestamp


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def short_str(value: bytes) -> tuple[int, str]:
    if not value:
        raise ValueError("Could not unpack short string value")
    length = value[0]
    return length + 1, _text(value[1 : length + 1])


def field_table(value: bytes) -> tuple[int, dict[str, Any]]:
    try:
        (length,) = _LENGTH.unpack_from(value)
        offset, end = 4, 4 + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        table: dict[str, Any] = {}
        while offset < end:
            key_length = value[offset]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = _text(value[offset : offset + key_length])
            offset += key_length
            consumed, table[key] = decode.embedded_value(value[offset:])
            offset += consumed
        return end, table
    except (struct.error, IndexError, TypeError) as err:
        raise ValueError("Could not unpack data") from err


def timestamp(value: bytes) -> tuple[int, datetime | None]:
    if len(value) < 8:
        return _pamqp_timestamp(value)  # cut short: fails as it always did
    try:
        return _pamqp_timestamp(value)
    except (ValueError, OverflowError, OSError):
        return 8, None


def install() -> None:
    """Decode every AMQP frame of this process with these functions (idempotent)."""
    decode.METHODS["shortstr"] = short_str
    decode.METHODS["table"] = field_table
    decode.METHODS["timestamp"] = timestamp
    decode.TABLE_MAPPING[b"F"] = field_table
    decode.TABLE_MAPPING[b"T"] = timestamp
