"""The api's HTTPS listener: a second uvicorn server in the same process, serving the same app.

uvicorn gives every socket a server serves the same TLS setting, and the api serves HTTPS on
one socket only: its plain public listener (if any) and the internal one RabbitMQ calls stay
plain. So the HTTPS socket gets a uvicorn server of its own, without a lifespan, around the very
app object the main server serves. The app's lifespan starts it, after the app is ready (before
uvicorn reports the process started), and stops it before the app closes its connections; that
happens in each worker process (`GATEWAY_API_WORKERS`), which all share the one HTTPS socket the
parent bound. Signals reach the HTTPS server first (it is the later one to catch them): it
finishes its open requests, then hands the signal on to the main server.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.runtime.settings import ApiSettings

log = logging.getLogger(__name__)


def check_files(settings: ApiSettings) -> None:
    """Load the certificate and key once, so a bad file stops the api with a clear message
    before it binds anything."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit(
            f"cannot use GATEWAY_TLS_CERT_FILE={settings.tls_cert_file} with "
            f"GATEWAY_TLS_KEY_FILE={settings.tls_key_file}: {exc}"
        ) from exc


class HttpsListener:
    """ASGI wrapper that serves `app` on `sock` with TLS for as long as `app`'s lifespan runs."""

    def __init__(
        self, app: ASGIApp, sock: socket.socket, settings: ApiSettings, **options: Any
    ) -> None:
        self.app = app
        self.sock = sock
        self.config = uvicorn.Config(
            app,
            lifespan="off",
            ssl_certfile=str(settings.tls_cert_file),
            ssl_keyfile=str(settings.tls_key_file),
            **options,
        )
        self.server = uvicorn.Server(self.config)
        self.task: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_after_start(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                try:
                    await self.start()
                except Exception as exc:
                    log.exception("the HTTPS listener did not start")
                    message = {"type": "lifespan.startup.failed", "message": str(exc)}
            await send(message)

        async def receive_after_stop() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.stop()
            return message

        await self.app(scope, receive_after_stop, send_after_start)

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve([self.sock]), name="https-listener")
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise RuntimeError("the HTTPS server stopped while starting")
            await asyncio.sleep(0.01)
        host, port = self.sock.getsockname()[:2]
        log.info("HTTPS on %s:%d", host, port)

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        await self.task
