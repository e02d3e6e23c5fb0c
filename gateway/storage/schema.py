"""Database schema (SQLAlchemy Core); the Alembic migrations in `gateway/storage/migrations`
create it."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = MetaData()

#: One row per device: the registry and its latest state.
devices = Table(
    "devices",
    metadata,
    Column("device_id", Text, primary_key=True),
    Column("heartbeat_interval_s", Integer, nullable=False, server_default=text("30")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("first_seen", DateTime(timezone=True)),
    Column("last_seen", DateTime(timezone=True)),
    Column("last_heartbeat_id", UUID(as_uuid=True)),
    Column("last_seq", BigInteger),
    Column("last_device_ts", DateTime(timezone=True)),
    Column("last_metrics", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("last_source", Text),
    #: Liveness: the stored status, when and why it last changed, and when an online device
    #: turns offline unless heard from (last_seen + factor x interval).
    Column("status", Text, nullable=False, server_default=text("'never_seen'")),
    Column("status_changed_at", DateTime(timezone=True)),
    Column("status_reason", Text),
    Column("offline_deadline", DateTime(timezone=True)),
    #: Bumped by every write; the Redis mirror keeps only the newest version.
    Column("version", BigInteger, nullable=False, server_default=text("1")),
    #: Credentials: the hash of the device's token (never the token), and whether it may connect.
    Column("token_hash", Text),
    Column("enabled", Boolean, nullable=False, server_default=text("true")),
    Column("registered_at", DateTime(timezone=True)),
    Column("token_rotated_at", DateTime(timezone=True)),
    Index("ix_devices_last_seen", "last_seen"),
    Index("ux_devices_token_hash", "token_hash", unique=True),
    Index(
        "ix_devices_online_deadline",
        "offline_deadline",
        postgresql_where=text("status = 'online'"),
    ),
    Index("ix_devices_status_changed", "status", "status_changed_at"),
)

#: Every stored heartbeat. `id` is derived from (device_id, msg_id), so a retry lands once.
#: Partitioned by day stored (`gateway.storage.partitions` explains how the id stays unique
#: across days).
heartbeats = Table(
    "heartbeats",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("stored_on", Date, primary_key=True),
    Column("device_id", Text, nullable=False),
    Column("msg_id", Text, nullable=False),
    Column("seq", BigInteger),
    Column("device_ts", DateTime(timezone=True)),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("stored_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("source", Text, nullable=False),
    Column("metrics", JSONB, nullable=False),
    Index("ix_heartbeats_device_received", "device_id", "received_at", "id"),
    postgresql_partition_by="RANGE (stored_on)",
)

#: Dead letters: input that could not become (or be stored as) a heartbeat.
rejected = Table(
    "rejected",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("stored_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("reason", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("device_id", Text),
    Column("topic", Text),
    Column("size", Integer, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("replayed_at", DateTime(timezone=True)),
    Index("ix_rejected_received", "received_at", "id"),
    Index("ix_rejected_device", "device_id", "received_at"),
    Index("ix_rejected_reason", "reason", "received_at"),
)

#: Dead letters received per device and hour (`device_key` '' for those without a device):
#: the cap's count, kept and over the cap alike (see `gateway.storage.writes.write_rejections`).
rejected_counts = Table(
    "rejected_counts",
    metadata,
    Column("hour", DateTime(timezone=True), primary_key=True),
    Column("device_key", Text, primary_key=True),
    Column("received", BigInteger, nullable=False),
)

#: Every change of a device's status, and why: timeout, last_will, heartbeat, status_message.
device_events = Table(
    "device_events",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("device_id", Text, nullable=False),
    Column("from_status", Text, nullable=False),
    Column("to_status", Text, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("reason", Text, nullable=False),
    Index("ix_device_events_device", "device_id", "id"),
    #: Retention deletes the oldest by this index.
    Index("ix_device_events_at", "at"),
)

#: Commands to devices and their lifecycle (`gateway.contract.commands`): pending, sent, then the
#: device's reply (succeeded, failed), expired or cancelled.
commands = Table(
    "commands",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("device_id", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("args", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True)),
    Column("sent_via", Text),
    Column("finished_at", DateTime(timezone=True)),
    Column("result", JSONB),
    #: Until when a dispatcher publishing the command keeps others off it.
    Column("claimed_until", DateTime(timezone=True)),
    Index("ix_commands_device_created", "device_id", "created_at", "id"),
    Index(
        "ix_commands_live_device",
        "device_id",
        "created_at",
        postgresql_where=text("status IN ('pending', 'sent')"),
    ),
    Index(
        "ix_commands_live_expiry",
        "expires_at",
        postgresql_where=text("status IN ('pending', 'sent')"),
    ),
    Index("ix_commands_pending", "created_at", postgresql_where=text("status = 'pending'")),
)
