"""Logging: one JSON object per line in containers, readable lines on a terminal."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import random
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

#: Set per HTTP request by the api; added to every log line written while it is handled.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


@contextlib.contextmanager
def request_scope(given: str | None) -> Iterator[str]:
    """An id for the request being handled, on every log line written meanwhile: the client's
    X-Request-ID (cut to 64 characters), or a new one. Ids need to be unique, not secret: the
    process's own generator (seeded from the OS when the process starts) costs no system call
    per request."""
    rid = (given or "")[:64] or f"{random.getrandbits(64):016x}"
    token = request_id.set(rid)
    try:
        yield rid
    finally:
        request_id.reset(token)


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if (rid := request_id.get()) is not None:
            entry["request_id"] = rid
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if (rid := request_id.get()) is not None:
            line = f"{line} [request_id={rid}]"
        return line


def configure(level: str = "INFO", fmt: str = "auto") -> None:
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiormq", "aio_pika", "httpx", "uvicorn.access", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
