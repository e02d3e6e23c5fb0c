"""Prometheus metrics shared by the services.

Each process exports its own, except where one service runs as several processes behind one
port (the api with `GATEWAY_API_WORKERS` > 1): there `multiprocess_directory()` gives every
process a file in a shared folder (prometheus_client's multiprocess mode) and `exposition()`
answers for all of them, so a scrape sees the service's totals whichever process it reaches.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

#: prometheus_client's own switch: set, every metric of the process writes to a file there.
MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def exposition() -> tuple[bytes, str]:
    """The text a scrape gets: this process's metrics, or every process's in multiprocess mode
    (counters and histograms summed, gauges of live processes)."""
    if os.environ.get(MULTIPROCESS_VARIABLE):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


@contextmanager
def multiprocess_directory() -> Iterator[Path]:
    """Multiprocess mode for the processes started inside the block (the variable must be set
    before they import prometheus_client): a fresh folder of this run's, removed afterwards. A
    folder the operator set is used as given, emptied first as prometheus_client requires."""
    given = os.environ.get(MULTIPROCESS_VARIABLE)
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
        yield folder
        return
    folder = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    os.environ[MULTIPROCESS_VARIABLE] = str(folder)
    try:
        yield folder
    finally:
        os.environ.pop(MULTIPROCESS_VARIABLE, None)
        shutil.rmtree(folder, ignore_errors=True)


RECEIVED = Counter(
    "gateway_heartbeats_received_messages_total", "Heartbeats accepted from devices", ["source"]
)
REJECTED = Counter(
    "gateway_rejected_messages_total", "Input refused and dead-lettered", ["source", "reason"]
)
PERSISTED = Counter(
    "gateway_heartbeats_persisted_messages_total", "Heartbeats committed to PostgreSQL (new rows)"
)
DUPLICATES = Counter(
    "gateway_heartbeats_duplicate_messages_total", "Heartbeats already stored (redelivery or retry)"
)
DEAD_LETTERS_STORED = Counter(
    "gateway_dead_letters_stored_messages_total", "Rows written to `rejected`"
)
#: By source only: a device label would let devices grow the label set without bound.
DEAD_LETTERS_OVER_CAP = Counter(
    "gateway_dead_letters_over_cap_messages_total",
    "Dead letters counted but not kept: over the cap per device and hour",
    ["source"],
)
RETENTION_DELETED = Counter(
    "gateway_retention_deleted_rows_total", "Rows deleted after their retention period", ["table"]
)
BATCH_SIZE = Histogram(
    "gateway_worker_batch_size_messages",
    "Messages per worker batch",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
)
BATCH_SECONDS = Histogram(
    "gateway_worker_batch_seconds", "Time to write one batch (transaction and Redis)"
)
LATENCY = Histogram(
    "gateway_receive_to_commit_seconds",
    "From receipt by bridge or api to commit in PostgreSQL",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STORE_ERRORS = Counter(
    "gateway_worker_store_errors_total", "Failed batch writes, by kind", ["kind"]
)
REDIS_ERRORS = Counter("gateway_redis_errors_total", "Failed Redis operations", ["service"])
PUBLISH_FAILURES = Counter(
    "gateway_publish_failures_total", "Publishes the broker did not confirm", ["service"]
)
AUTH_FAILURES = Counter(
    "gateway_auth_failures_total", "Refused device credentials", ["transport", "reason"]
)
STATUS_CHANGES = Counter(
    "gateway_status_changes_total", "Device status changes", ["to_status", "reason"]
)
QUEUE_DEPTH = Gauge(
    "gateway_queue_depth_messages",
    "Messages waiting in a gateway queue (consumer lag), as the broker counts them",
    ["queue"],
    multiprocess_mode="livemax",
)
SWEEPER_LEADER = Gauge(
    "gateway_sweeper_leader",
    "1 while this worker is the one sweeper",
    multiprocess_mode="livemax",
)
SESSION_CLOSE_FAILURES = Counter(
    "gateway_session_close_failures_total",
    "Devices disabled or rotated whose open broker connections could not be closed",
)
COMMAND_CHANGES = Counter(
    "gateway_command_changes_total",
    "Commands moved to a status (counted as the change is written, before its commit)",
    ["status"],
)
