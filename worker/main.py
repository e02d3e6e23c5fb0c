"""Entry point: `gateway-worker`."""

from __future__ import annotations

import sys

from gateway.runtime import lifecycle
from gateway.runtime.settings import WorkerSettings, load
from worker.service import Worker


def main() -> int:
    settings = load(WorkerSettings)
    return lifecycle.run("worker", settings, Worker(settings).serve)


if __name__ == "__main__":
    sys.exit(main())
