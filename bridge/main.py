"""Entry point: `gateway-bridge`."""

from __future__ import annotations

import sys

from bridge.service import Bridge
from gateway.runtime import lifecycle
from gateway.runtime.settings import BridgeSettings, load


def main() -> int:
    settings = load(BridgeSettings)
    return lifecycle.run("bridge", settings, Bridge(settings).serve)


if __name__ == "__main__":
    sys.exit(main())
