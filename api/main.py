"""Entry point: `gateway-api` (uvicorn), on two listeners.

The public listener (`GATEWAY_API_HOST:GATEWAY_API_PORT`) serves devices and operators; the
internal one (`GATEWAY_API_INTERNAL_HOST:GATEWAY_API_INTERNAL_PORT`) serves only the endpoints
RabbitMQ calls to admit devices. One app, two sockets: a request knows which one it came in on.
"""

from __future__ import annotations

import signal
import socket
import sys

import uvicorn
from uvicorn.supervisors import Multiprocess

from gateway import logs
from gateway.settings import ApiSettings, load


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def main() -> int:
    settings = load(ApiSettings)  # refuses an unsafe operator token outside development
    logs.configure(settings.log_level, settings.log_format)
    config = uvicorn.Config(
        "api.app:create_server",
        factory=True,
        workers=settings.api_workers,
        log_config=None,
        access_log=False,
        # Nothing here reads the client's address or scheme (no access log, no absolute URLs),
        # so the X-Forwarded-* rewriting layer would be work for nothing on every request.
        proxy_headers=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
    )
    sockets = [
        listen(settings.api_host, settings.api_port),
        listen(settings.api_internal_host, settings.api_internal_port),
    ]
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler
    # that was there before it: make that a clean exit, so a stop is not reported as a crash.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    if settings.api_workers > 1:
        Multiprocess(config, sockets=sockets).run()
    else:
        uvicorn.Server(config).run(sockets=sockets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
