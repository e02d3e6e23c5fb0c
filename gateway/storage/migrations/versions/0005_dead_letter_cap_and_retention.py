"""Dead letters capped per device and hour (their count), and retention of dead letters and
status events by batched DELETE (`ix_device_events_at`; `rejected` has its time index).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rejected_counts",
        sa.Column("hour", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("device_key", sa.Text, primary_key=True),
        sa.Column("received", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_device_events_at", "device_events", ["at"])


def downgrade() -> None:
    op.drop_index("ix_device_events_at", table_name="device_events")
    op.drop_table("rejected_counts")
