"""Why input is refused: one reason code per kind of bad input, shared by MQTT and HTTP."""

from __future__ import annotations

import logging
import re
import time
from enum import StrEnum

log = logging.getLogger(__name__)


class Reason(StrEnum):
    TOO_LARGE = "too_large"
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_AN_OBJECT = "not_an_object"
    DUPLICATE_KEY = "duplicate_key"
    TOO_DEEP = "too_deep"
    NON_FINITE_NUMBER = "non_finite_number"
    INVALID_FIELD = "invalid_field"
    INVALID_DEVICE_ID = "invalid_device_id"
    UNKNOWN_TOPIC = "unknown_topic"
    INVALID_STATUS = "invalid_status"
    INVALID_MESSAGE = "invalid_message"
    UNSTORABLE = "unstorable"
    #: Sent before its device was disabled, stored after: never stored as the device's.
    DEVICE_DISABLED = "device_disabled"
    #: A command reply naming no command, another device's, or one no longer live.
    UNKNOWN_COMMAND = "unknown_command"
    FOREIGN_COMMAND = "foreign_command"
    COMMAND_EXPIRED = "command_expired"
    COMMAND_CANCELLED = "command_cancelled"
    #: Not a message: one entry per device and hour, counting the dead letters over the cap.
    OVER_CAP = "over_cap"
    #: Conversion failed in a way nobody foresaw (a bug to fix); the detail names the exception.
    UNEXPECTED_ERROR = "unexpected_error"


#: The longest detail kept: enough for any message of ours, and for an exception's.
MAX_DETAIL = 1000

#: What no text column, JSON document or UTF-8 encoder takes: NUL and lone surrogates.
_UNSTORABLE_CHARACTERS = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str, limit: int = MAX_DETAIL) -> str:
    """`text` cut to `limit` characters, with NUL and lone surrogates (which PostgreSQL's
    `text`, JSON and UTF-8 all refuse) written as escapes (`\\x00`, `\\udcff`)."""
    text = text[:limit]
    if _UNSTORABLE_CHARACTERS.search(text) is None:
        return text
    return _UNSTORABLE_CHARACTERS.sub(lambda m: ascii(m.group())[1:-1], text)


class InputError(ValueError):
    """Input that cannot become a canonical message. `detail` is safe to show to its sender
    (and to store: see `storable_text`)."""

    def __init__(self, reason: Reason, detail: str) -> None:
        detail = storable_text(detail)
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


#: Seconds between two logged tracebacks of the same kind of unforeseen exception.
_LOG_EVERY_S = 60.0
_last_logged: dict[type, float] = {}


def unforeseen(exc: Exception, what: str = "input") -> InputError:
    """An exception nobody foresaw while converting `what`, as that input's refusal (reason
    `unexpected_error`; the detail keeps the exception's class and message). Its traceback is
    logged, at most once a minute per exception class: a device can send the same input many
    times, and each copy costs a dead letter, not a log line."""
    kind = type(exc)
    now = time.monotonic()
    if now - _last_logged.get(kind, -_LOG_EVERY_S) >= _LOG_EVERY_S:
        _last_logged[kind] = now
        log.error("unexpected error converting %s; it becomes a dead letter", what, exc_info=exc)
    return InputError(Reason.UNEXPECTED_ERROR, f"{kind.__qualname__}: {exc}")
