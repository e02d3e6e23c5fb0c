"""Entry point: `gateway-bridge`."""

from __future__ import annotations

import sys

from bridge.service import Bridge
from gateway import service
from gateway.settings import BridgeSettings, load


def main() -> int:
    settings = load(BridgeSettings)
    return service.run("bridge", settings, Bridge(settings).serve)


if __name__ == "__main__":
    sys.exit(main())
