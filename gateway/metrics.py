"""Prometheus metrics shared by the services (each process exports its own)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECEIVED = Counter(
    "gateway_heartbeats_received_total", "Heartbeats accepted from devices", ["source"]
)
REJECTED = Counter(
    "gateway_rejected_total", "Input refused and dead-lettered", ["source", "reason"]
)
PERSISTED = Counter(
    "gateway_heartbeats_persisted_total", "Heartbeats committed to PostgreSQL (new rows)"
)
DUPLICATES = Counter(
    "gateway_heartbeats_duplicate_total", "Heartbeats already stored (redelivery or retry)"
)
DEAD_LETTERS_STORED = Counter("gateway_dead_letters_stored_total", "Rows written to `rejected`")
#: By source only: a device label would let devices grow the label set without bound.
DEAD_LETTERS_OVER_CAP = Counter(
    "gateway_dead_letters_over_cap_total",
    "Dead letters counted but not kept: over the cap per device and hour",
    ["source"],
)
RETENTION_DELETED = Counter(
    "gateway_retention_deleted_total", "Rows deleted after their retention period", ["table"]
)
BATCH_SIZE = Histogram(
    "gateway_worker_batch_size",
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
    "gateway_queue_depth",
    "Messages waiting in a gateway queue (consumer lag), as the broker counts them",
    ["queue"],
)
SWEEPER_LEADER = Gauge("gateway_sweeper_leader", "1 while this worker is the one sweeper")
SESSION_CLOSE_FAILURES = Counter(
    "gateway_session_close_failures_total",
    "Devices disabled or rotated whose open broker connections could not be closed",
)
COMMAND_CHANGES = Counter(
    "gateway_command_changes_total",
    "Commands moved to a status (counted as the change is written, before its commit)",
    ["status"],
)
