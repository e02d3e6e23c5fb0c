"""Commands to devices: one row per command, its status moved forward by conditional updates.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
LIVE = sa.text("status IN ('pending', 'sent')")


def upgrade() -> None:
    op.create_table(
        "commands",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("device_id", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("args", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'pending'")),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("sent_at", TS),
        sa.Column("sent_via", sa.Text),
        sa.Column("finished_at", TS),
        sa.Column("result", JSONB),
        sa.Column("claimed_until", TS),
    )
    op.create_index("ix_commands_device_created", "commands", ["device_id", "created_at", "id"])
    op.create_index(
        "ix_commands_live_device", "commands", ["device_id", "created_at"], postgresql_where=LIVE
    )
    op.create_index("ix_commands_live_expiry", "commands", ["expires_at"], postgresql_where=LIVE)
    op.create_index(
        "ix_commands_pending",
        "commands",
        ["created_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_table("commands")
