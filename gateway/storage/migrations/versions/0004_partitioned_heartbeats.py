"""Heartbeats partitioned by the day they were stored (`stored_on`), for retention by partition.

The primary key becomes `(id, stored_on)`: PostgreSQL keeps a key unique per partition only, so
the worker looks older partitions up before it inserts (see `gateway.storage.partitions`).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = "id, device_id, msg_id, seq, device_ts, received_at, stored_at, source, metrics"
#: Every column but the key, as 0001 created them.
DATA_COLUMNS = """
  device_id text NOT NULL,
  msg_id text NOT NULL,
  seq bigint,
  device_ts timestamptz,
  received_at timestamptz NOT NULL,
  stored_at timestamptz NOT NULL DEFAULT now(),
  source text NOT NULL,
  metrics jsonb NOT NULL"""
INDEX = "CREATE INDEX ix_heartbeats_device_received ON heartbeats (device_id, received_at, id)"


def _set_aside(name: str) -> None:
    """Rename `heartbeats`, its index and its key out of the way of the new table."""
    op.execute(f"ALTER TABLE heartbeats RENAME TO {name}")
    op.execute(f"ALTER INDEX ix_heartbeats_device_received RENAME TO ix_{name}")
    op.execute(f"ALTER TABLE {name} RENAME CONSTRAINT heartbeats_pkey TO {name}_pkey")


def upgrade() -> None:
    _set_aside("heartbeats_unpartitioned")
    op.execute(
        f"""
        CREATE TABLE heartbeats (
          id uuid NOT NULL,
          stored_on date NOT NULL,{DATA_COLUMNS},
          CONSTRAINT heartbeats_pkey PRIMARY KEY (id, stored_on)
        ) PARTITION BY RANGE (stored_on)
        """
    )
    # A partition for every day already stored, and for yesterday to three days ahead; the
    # worker keeps creating them ahead from now on.
    op.execute(
        """
        DO $$
        DECLARE
          today date := (now() AT TIME ZONE 'UTC')::date;
          first date := LEAST(
            today - 1,
            (SELECT (min(stored_at) AT TIME ZONE 'UTC')::date FROM heartbeats_unpartitioned));
          day date;
        BEGIN
          FOR day IN SELECT generate_series(first, today + 3, interval '1 day')::date LOOP
            EXECUTE format(
              'CREATE TABLE %I PARTITION OF heartbeats FOR VALUES FROM (%L) TO (%L)',
              'heartbeats_' || to_char(day, 'YYYYMMDD'), day, day + 1);
          END LOOP;
        END $$
        """
    )
    op.execute(
        f"INSERT INTO heartbeats (stored_on, {COLUMNS}) "
        f"SELECT (stored_at AT TIME ZONE 'UTC')::date, {COLUMNS} FROM heartbeats_unpartitioned"
    )
    op.execute("DROP TABLE heartbeats_unpartitioned")
    op.execute(INDEX)  # once the rows are in: one build, not one insert at a time


def downgrade() -> None:
    _set_aside("heartbeats_partitioned")
    op.execute(f"CREATE TABLE heartbeats (id uuid PRIMARY KEY,{DATA_COLUMNS})")
    op.execute(
        f"INSERT INTO heartbeats ({COLUMNS}) SELECT DISTINCT ON (id) {COLUMNS} "
        "FROM heartbeats_partitioned ORDER BY id, stored_on"
    )
    op.execute("DROP TABLE heartbeats_partitioned")
    op.execute(INDEX)
