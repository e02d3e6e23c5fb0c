"""A tiny HTTP server for the bridge and worker: /healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from gateway.runtime import metrics

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]


#: Redis only speeds reads up: without it every service still works.
OPTIONAL = frozenset({"redis"})


class HealthServer:
    """Answers `GET /healthz` (process up), `GET /readyz` (dependencies) and `GET /metrics`."""

    def __init__(
        self, host: str, port: int, ready: ReadyCheck, optional: frozenset[str] = OPTIONAL
    ) -> None:
        self.host, self.port, self._ready = host, port, ready
        #: Checks reported but not required: the service works (degraded) without them.
        self.optional = optional
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        if self.port == 0:
            return
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        log.info(
            "health endpoints on http://%s:%d (/healthz /readyz /metrics)", self.host, self.port
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (
                b"\r\n",
                b"\n",
                b"",
            ):
                pass
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            status, body, content_type = await self._route(parts[0] if parts else "", path)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _route(self, method: str, path: str) -> tuple[str, bytes, str]:
        if method != "GET":
            return "405 Method Not Allowed", b'{"detail":"method not allowed"}', "application/json"
        if path == "/healthz":
            return "200 OK", b'{"status":"ok"}', "application/json"
        if path == "/readyz":
            try:
                checks = await asyncio.wait_for(self._ready(), timeout=5)
            except Exception:  # a failing check means "not ready", never a crash
                checks = {"checks": False}
            ok = is_ready(checks, self.optional)
            body = json.dumps({"ready": ok, "checks": checks}).encode()
            return ("200 OK" if ok else "503 Service Unavailable"), body, "application/json"
        if path == "/metrics":
            body, content_type = metrics.exposition()
            return "200 OK", body, content_type
        return "404 Not Found", b'{"detail":"not found"}', "application/json"


def is_ready(checks: dict[str, bool], optional: frozenset[str] = OPTIONAL) -> bool:
    """Ready when every check passed that is not optional."""
    return all(ok for name, ok in checks.items() if name not in optional)
