"""Plain ASGI layers around the app."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.runtime import logs


class RequestId:
    """Give every request an id (the client's X-Request-ID, or a new one): on every log line
    written while it is handled, and in the response. Plain ASGI, so it costs next to nothing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with logs.request_scope(Headers(scope=scope).get("x-request-id")) as rid:

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [
                        *message.get("headers", []),
                        (b"x-request-id", rid.encode("latin-1")),
                    ]
                await send(message)

            await self.app(scope, receive, send_with_id)
