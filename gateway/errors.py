"""Why input is refused: one reason code per kind of bad input, shared by MQTT and HTTP."""

from __future__ import annotations

from enum import StrEnum


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
    #: Not a message: one entry per device and hour, counting the dead letters over the cap.
    OVER_CAP = "over_cap"


class InputError(ValueError):
    """Input that cannot become a canonical message. `detail` is safe to show to its sender."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
