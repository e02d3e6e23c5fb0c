"""Devices, heartbeats and dead letters.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("device_id", sa.Text, primary_key=True),
        sa.Column("heartbeat_interval_s", sa.Integer, nullable=False, server_default="30"),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("first_seen", TS),
        sa.Column("last_seen", TS),
        sa.Column("last_heartbeat_id", UUID(as_uuid=True)),
        sa.Column("last_seq", sa.BigInteger),
        sa.Column("last_device_ts", TS),
        sa.Column("last_metrics", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("last_source", sa.Text),
        sa.Column("reported_status", sa.Text),
        sa.Column("reported_status_at", TS),
        sa.Column("version", sa.BigInteger, nullable=False, server_default="1"),
    )
    op.create_index("ix_devices_last_seen", "devices", ["last_seen"])
    op.create_table(
        "heartbeats",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("device_id", sa.Text, nullable=False),
        sa.Column("msg_id", sa.Text, nullable=False),
        sa.Column("seq", sa.BigInteger),
        sa.Column("device_ts", TS),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("stored_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("metrics", JSONB, nullable=False),
    )
    op.create_index(
        "ix_heartbeats_device_received", "heartbeats", ["device_id", "received_at", "id"]
    )
    op.create_table(
        "rejected",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("stored_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("device_id", sa.Text),
        sa.Column("topic", sa.Text),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("replayed_at", TS),
    )
    op.create_index("ix_rejected_received", "rejected", ["received_at", "id"])
    op.create_index("ix_rejected_device", "rejected", ["device_id", "received_at"])
    op.create_index("ix_rejected_reason", "rejected", ["reason", "received_at"])


def downgrade() -> None:
    op.drop_table("rejected")
    op.drop_table("heartbeats")
    op.drop_table("devices")
