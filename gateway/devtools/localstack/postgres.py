"""The stack's PostgreSQL cluster: created once, started, emptied, migrated."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.amqp import accounts, topology
from gateway.devtools.localstack.base import (
    DATABASE,
    DATABASE_USER,
    StackError,
    find_postgres_bindir,
    require_free,
    terminate,
)


class PostgresCluster:
    """The part of `LocalStack` that runs PostgreSQL."""

    def start_postgres(self) -> None:
        if self.component("postgres").pid():
            return
        base = self.run_dir / "postgres"
        data = base / "data"
        bindir = _postgres_bindir()
        as_owner = _postgres_runner(base)
        if not (data / "PG_VERSION").exists():
            _chown_for_postgres(base)
            subprocess.run(
                [
                    *as_owner,
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    DATABASE_USER,
                    # Local (socket) connections are trusted: only this machine's users reach
                    # the socket, which lives in the stack's own folder. TCP needs the password.
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        require_free(self.ports.postgres)
        options = (
            f"-p {self.ports.postgres} -c listen_addresses=127.0.0.1 -k {base} "
            "-c max_connections=200 -c shared_buffers=256MB -c synchronous_commit=on"
            + "".join(f" -c {name}={value}" for name, value in self.postgres_settings.items())
        )
        subprocess.run(
            [
                *as_owner,
                str(bindir / "pg_ctl"),
                "start",
                "-D",
                str(data),
                "-l",
                str(self.component("postgres").log_file),
                "-o",
                options,
                "-w",
                "-t",
                "60",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self._create_database()

    def _create_database(self) -> None:
        with self.postgres_admin() as cur:
            # The stack's secret, set on every start (a lost secret file is simply replaced).
            cur.execute(f'ALTER ROLE "{DATABASE_USER}" PASSWORD %s', (self.secret("postgres"),))
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{DATABASE}"')

    @contextlib.contextmanager
    def postgres_admin(self) -> Iterator[Any]:
        """A cursor on the `postgres` database over the stack's own socket, in autocommit (for
        CREATE and DROP DATABASE, and setting the role's password)."""
        import psycopg2

        with contextlib.closing(
            psycopg2.connect(
                host=str(self.run_dir / "postgres"),
                port=self.ports.postgres,
                user=DATABASE_USER,
                dbname="postgres",
                connect_timeout=5,
            )
        ) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                yield cur

    def empty(self) -> None:
        """Start over from nothing stored: a new, migrated gateway database, no Redis keys and
        empty queues (benchmarks start each run from the same state). Stops the apps first."""
        import redis

        for name in ("api", "bridge", "worker"):
            self.stop_app(name)
        with self.postgres_admin() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        self._create_database()
        self.migrate()
        with contextlib.closing(redis.Redis.from_url(self.redis_url)) as client:
            client.flushdb()
        self.purge(topology.MQTT_INBOX_QUEUE, topology.WORK_QUEUE, topology.REJECTED_QUEUE)

    def purge(self, *queues: str) -> None:
        """Empty these queues of the gateway (over AMQP as the bridge, whose account may read
        every one: the administrator has no access to the vhost's messages)."""
        import aio_pika
        from aio_pika.exceptions import ChannelNotFoundEntity

        async def purge_all() -> None:
            async with await aio_pika.connect(self.amqp_url_for(accounts.BRIDGE)) as connection:
                for queue in queues:
                    channel = await connection.channel()
                    with contextlib.suppress(ChannelNotFoundEntity):  # not declared yet
                        await (await channel.get_queue(queue)).purge()

        asyncio.run(purge_all())

    def stop_postgres(self, *, mode: str = "fast") -> None:
        """`pg_ctl stop` in `mode`: `fast` (sessions ended, a checkpoint, then exit) or
        `immediate` (every process quits at once, no checkpoint: the next start recovers from
        the WAL, as after a crash)."""
        component = self.component("postgres")
        pid = component.pid()
        if pid is None:
            return
        base = self.run_dir / "postgres"
        subprocess.run(
            [
                *_postgres_runner(base),
                str(_postgres_bindir() / "pg_ctl"),
                "stop",
                "-D",
                str(base / "data"),
                "-m",
                mode,
                "-w",
            ],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        terminate(pid, component.signature, timeout=30)

    def migrate(self) -> None:
        from gateway.storage.engine import migrate

        migrate(self.database_url)


def _postgres_bindir() -> Path:
    bindir = find_postgres_bindir()
    if bindir is None:
        raise StackError("PostgreSQL is not installed: apt-get install -y postgresql")
    return bindir


def _postgres_runner(base: Path) -> list[str]:
    """initdb and pg_ctl refuse to run as root: run them as the `postgres` user then."""
    base.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


def _chown_for_postgres(base: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        for path in base.rglob("*"):
            shutil.chown(path, "postgres", "postgres")


# ---- processes ----------------------------------------------------------------------------
