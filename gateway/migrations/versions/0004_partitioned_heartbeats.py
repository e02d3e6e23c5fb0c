"""Heartbeats partitioned by the day they were stored (`stored_on`), for retention by partition.

The primary key becomes `(id, stored_on)`: PostgreSQL keeps a key unique per partition only, so
the worker looks older partitions up before it inserts (see `gateway.partitions`).

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


def upgrade() -> None:
    op.execute("ALTER TABLE heartbeats RENAME TO heartbeats_unpartitioned")
    op.execute("ALTER INDEX ix_heartbeats_device_received RENAME TO ix_heartbeats_unpartitioned")
    op.execute(
        "ALTER TABLE heartbeats_unpartitioned "
        "RENAME CONSTRAINT heartbeats_pkey TO heartbeats_unpartitioned_pkey"
    )
    op.execute(
        """
        CREATE TABLE heartbeats (
          id uuid NOT NULL,
          stored_on date NOT NULL,
          device_id text NOT NULL,
          msg_id text NOT NULL,
          seq bigint,
          device_ts timestamptz,
          received_at timestamptz NOT NULL,
          stored_at timestamptz NOT NULL DEFAULT now(),
          source text NOT NULL,
          metrics jsonb NOT NULL,
          CONSTRAINT heartbeats_pkey PRIMARY KEY (id, stored_on)
        ) PARTITION BY RANGE (stored_on)
        """
    )
    op.execute(
        "CREATE INDEX ix_heartbeats_device_received ON heartbeats (device_id, received_at, id)"
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


def downgrade() -> None:
    op.execute("ALTER TABLE heartbeats RENAME TO heartbeats_partitioned")
    op.execute("ALTER INDEX ix_heartbeats_device_received RENAME TO ix_heartbeats_partitioned")
    op.execute(
        "ALTER TABLE heartbeats_partitioned "
        "RENAME CONSTRAINT heartbeats_pkey TO heartbeats_partitioned_pkey"
    )
    op.execute(
        f"""
        CREATE TABLE heartbeats (
          id uuid PRIMARY KEY,
          device_id text NOT NULL,
          msg_id text NOT NULL,
          seq bigint,
          device_ts timestamptz,
          received_at timestamptz NOT NULL,
          stored_at timestamptz NOT NULL DEFAULT now(),
          source text NOT NULL,
          metrics jsonb NOT NULL
        );
        INSERT INTO heartbeats ({COLUMNS})
          SELECT DISTINCT ON (id) {COLUMNS} FROM heartbeats_partitioned ORDER BY id, stored_on;
        DROP TABLE heartbeats_partitioned;
        CREATE INDEX ix_heartbeats_device_received ON heartbeats (device_id, received_at, id);
        """
    )
