"""Entry point: `gateway-api` (uvicorn)."""

from __future__ import annotations

import sys

import uvicorn

from gateway import logs
from gateway.settings import ApiSettings


def main() -> int:
    settings = ApiSettings()  # refuses an unsafe operator token outside development
    logs.configure(settings.log_level, settings.log_format)
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=settings.api_host,
        port=settings.api_port,
        workers=settings.api_workers,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
