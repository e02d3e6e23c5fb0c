"""Device credentials: a token hash per device, enable/disable, registration time.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("token_hash", sa.Text))
    op.add_column(
        "devices", sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true())
    )
    op.add_column("devices", sa.Column("registered_at", sa.DateTime(timezone=True)))
    op.add_column("devices", sa.Column("token_rotated_at", sa.DateTime(timezone=True)))
    op.create_index("ux_devices_token_hash", "devices", ["token_hash"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_devices_token_hash", "devices")
    for column in ("token_rotated_at", "registered_at", "enabled", "token_hash"):
        op.drop_column("devices", column)
