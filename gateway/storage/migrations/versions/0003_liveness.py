"""Liveness: a stored status per device with its offline deadline, and status events.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column(
        "devices", sa.Column("status", sa.Text, nullable=False, server_default="never_seen")
    )
    op.add_column("devices", sa.Column("status_changed_at", TS))
    op.add_column("devices", sa.Column("status_reason", sa.Text))
    op.add_column("devices", sa.Column("offline_deadline", TS))
    op.execute(
        """
        UPDATE devices SET
          offline_deadline = last_seen + make_interval(secs => heartbeat_interval_s * 3),
          status = CASE
            WHEN last_seen IS NULL THEN 'never_seen'
            WHEN reported_status = 'offline' AND reported_status_at >= last_seen THEN 'offline'
            WHEN last_seen + make_interval(secs => heartbeat_interval_s * 3) > now()
              THEN 'online'
            ELSE 'offline' END,
          status_changed_at = COALESCE(reported_status_at, last_seen),
          status_reason = CASE WHEN last_seen IS NULL THEN NULL ELSE 'heartbeat' END
        """
    )
    op.drop_column("devices", "reported_status")
    op.drop_column("devices", "reported_status_at")
    # The sweeper's query: online devices whose deadline has passed, without a full scan.
    op.create_index(
        "ix_devices_online_deadline",
        "devices",
        ["offline_deadline"],
        postgresql_where=sa.text("status = 'online'"),
    )
    op.create_index("ix_devices_status_changed", "devices", ["status", "status_changed_at"])
    op.create_table(
        "device_events",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("device_id", sa.Text, nullable=False),
        sa.Column("from_status", sa.Text, nullable=False),
        sa.Column("to_status", sa.Text, nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.create_index("ix_device_events_device", "device_events", ["device_id", "id"])


def downgrade() -> None:
    op.drop_table("device_events")
    op.drop_index("ix_devices_status_changed", "devices")
    op.drop_index("ix_devices_online_deadline", "devices")
    op.add_column("devices", sa.Column("reported_status", sa.Text))
    op.add_column("devices", sa.Column("reported_status_at", TS))
    for column in ("offline_deadline", "status_reason", "status_changed_at", "status"):
        op.drop_column("devices", column)
