"""Entry point: `gateway-api` (uvicorn), on up to three listeners.

The public listener (`GATEWAY_API_HOST:GATEWAY_API_PORT`, 0 = off) serves devices and operators
over plain HTTP; the HTTPS one (`GATEWAY_API_TLS_HOST:GATEWAY_API_TLS_PORT`, 0 = off) serves the
same over TLS (api/https.py); the internal one (`GATEWAY_API_INTERNAL_HOST:
GATEWAY_API_INTERNAL_PORT`) serves only the endpoints RabbitMQ calls to admit devices. One app
on every socket: a request knows which one it came in on.
"""

from __future__ import annotations

import functools
import signal
import socket
import sys
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.supervisors import Multiprocess

from api import https
from api.app import create_server
from gateway.runtime import logs, metrics
from gateway.runtime.settings import ApiSettings, load


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def server_options(settings: ApiSettings) -> dict[str, Any]:
    """What every uvicorn server of the api is configured with."""
    return {
        "log_config": None,
        "access_log": False,
        # Nothing here reads the client's address or scheme (no access log, no absolute URLs),
        # so the X-Forwarded-* rewriting layer would be work for nothing on every request.
        "proxy_headers": False,
        "timeout_graceful_shutdown": int(settings.shutdown_timeout_s),
    }


def create_served_app(https_socket: socket.socket | None = None) -> ASGIApp:
    """What uvicorn serves, built in each worker process: the app, and its HTTPS listener on
    `https_socket` (bound by the parent, handed to the workers)."""
    settings = ApiSettings()
    app = create_server(settings)
    if https_socket is None:
        return app
    return https.HttpsListener(app, https_socket, settings, **server_options(settings))


def main() -> int:
    settings = load(ApiSettings)  # refuses an unsafe operator token outside development
    logs.configure(settings.log_level, settings.log_format)
    https_socket = None
    if settings.api_tls_port:
        https.check_files(settings)
        https_socket = listen(settings.api_tls_host or settings.api_host, settings.api_tls_port)
    sockets = [listen(settings.api_internal_host, settings.api_internal_port)]
    if settings.api_port:
        sockets.insert(0, listen(settings.api_host, settings.api_port))
    config = uvicorn.Config(
        functools.partial(create_served_app, https_socket),
        factory=True,
        workers=settings.api_workers,
        **server_options(settings),
    )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler
    # that was there before it: make that a clean exit, so a stop is not reported as a crash.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    if settings.api_workers > 1:
        # Set before the workers start, so their metrics are summed at every scrape.
        with metrics.multiprocess_directory():
            Multiprocess(config, sockets=sockets).run()
    else:
        uvicorn.Server(config).run(sockets=sockets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
