"""The local stack's commands, as `make up` and `make status` run them (`gateway stack up|status`,
here on the test stack): `up` is idempotent (a stack that runs is left as it is) and prints
where everything listens and the operator token; `status` shows what runs. And `make run`'s
own code on a stack of its own (its own folder and free ports): everything starts, and
Ctrl-C stops everything."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from gateway.devtools.localstack import PROJECT_ROOT, TEST_PORTS, LocalStack, Ports

pytestmark = pytest.mark.e2e

GATEWAY = str(Path(sys.executable).parent / "gateway")


def gateway_stack(action: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [GATEWAY, "stack", action, "--name", "test"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_up_again_starts_nothing_and_says_where_everything_listens(apps: LocalStack) -> None:
    before = apps.status()
    assert all(before.values()), before
    done = gateway_stack("up")
    assert done.returncode == 0, done.stdout + done.stderr
    assert apps.status() == before  # the same processes: nothing started twice
    assert all(apps.app_ready(name) for name in ("worker", "bridge", "api"))
    for where in (
        f"127.0.0.1:{apps.ports.mqtt}",
        f"127.0.0.1:{apps.ports.mqtt_tls}",
        f"wss://127.0.0.1:{apps.ports.web_mqtt_tls}/ws",
        apps.api_url,
        apps.api_https_url,
        f"operator token: {apps.operator_token()}",
        str(apps.run_dir / "secrets"),
    ):
        assert where in done.stdout, (where, done.stdout)


def test_status_shows_what_runs(apps: LocalStack) -> None:
    done = gateway_stack("status")
    assert done.returncode == 0, done.stderr
    shown = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert shown == {name: f"running, pid {pid}" for name, pid in apps.status().items()}


def free_ports(count: int) -> list[int]:
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
    try:
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


RUN = """
import sys
from pathlib import Path
from gateway.devtools.localstack import LocalStack, Ports
LocalStack("run", Ports(*map(int, sys.argv[2:])), root=Path(sys.argv[1])).run()
"""


@pytest.mark.slow
def test_run_starts_everything_and_ctrl_c_stops_everything(apps: LocalStack) -> None:
    """`make run` (`LocalStack.run`) on a stack of its own: it says where everything listens
    once everything is ready; Ctrl-C stops every process it started, and it exits 0. (A
    folder of the project's: PostgreSQL's own user must reach it.)"""
    root = PROJECT_ROOT / ".run" / f"run-{uuid.uuid4().hex[:8]}"
    ports = Ports(*free_ports(len(dataclasses.fields(TEST_PORTS))))
    stack = LocalStack("run", ports, root=root)
    process = subprocess.Popen(
        [sys.executable, "-c", RUN, str(root), *map(str, dataclasses.astuple(ports))],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if line.startswith("Ctrl-C stops the stack."):
                break
        assert output and output[-1].startswith("Ctrl-C"), "".join(output)
        running = stack.status()
        assert all(running.values()), running
        assert all(stack.app_ready(name) for name in ("worker", "bridge", "api"))
        assert f"127.0.0.1:{ports.mqtt}" in "".join(output)
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=180)
        assert process.returncode == 0, rest
        assert "stack run: stopped" in rest
        assert stack.status() == dict.fromkeys(running)  # every process gone
    finally:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(Exception):
            stack.down(echo=False)
        shutil.rmtree(root, ignore_errors=True)


def test_the_stack_empties_its_queues(stack) -> None:
    """What benchmarks start from: `LocalStack.purge` empties a gateway queue (the administrator
    may not; the bridge's account does)."""
    import asyncio

    import aio_pika

    from gateway.amqp import accounts

    name = f"gateway.purge-{uuid.uuid4().hex[:8]}"

    async def depth_after(purge: bool) -> int:
        async with await aio_pika.connect(stack.amqp_url_for(accounts.BRIDGE)) as connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(name, "fanout")
            queue = await channel.declare_queue(name)
            await queue.bind(exchange)
            if not purge:
                await exchange.publish(aio_pika.Message(b"x"), "")
                return 0
            declared = await channel.declare_queue(name, passive=True)
            await queue.delete(if_unused=False, if_empty=False)
            await exchange.delete()
            return declared.declaration_result.message_count

    asyncio.run(depth_after(purge=False))
    stack.purge(name, "gateway.never-declared")
    assert asyncio.run(depth_after(purge=True)) == 0


@pytest.mark.slow
def test_a_deleted_secret_is_replaced_at_the_next_start(apps: LocalStack) -> None:
    """The rotation procedure of docs/security.md for the local stack: delete a secret's file,
    restart, and the old password is refused while the new one works (a broker account,
    PostgreSQL's role and Redis), on a stack of its own."""
    import asyncio

    import aio_pika
    import psycopg2
    import redis

    from gateway.amqp import accounts

    root = PROJECT_ROOT / ".run" / f"rotate-{uuid.uuid4().hex[:8]}"
    stack = LocalStack("rotate", Ports(*free_ports(len(dataclasses.fields(TEST_PORTS)))), root=root)

    def amqp_ok(password: str) -> bool:
        async def attempt() -> bool:
            url = f"amqp://{accounts.BRIDGE}:{password}@127.0.0.1:{stack.ports.amqp}/%2F"
            try:
                await (await aio_pika.connect(url, timeout=10)).close()
            except Exception:  # refused during the handshake, in one of several ways
                return False
            return True

        return asyncio.run(attempt())

    def postgres_ok(password: str) -> bool:
        try:
            psycopg2.connect(
                host="127.0.0.1",
                port=stack.ports.postgres,
                user="gateway",
                password=password,
                dbname="gateway",
                connect_timeout=5,
            ).close()
        except psycopg2.OperationalError:
            return False
        return True

    def redis_ok(password: str) -> bool:
        client = redis.Redis(port=stack.ports.redis, password=password, socket_timeout=5)
        try:
            return bool(client.ping())
        except redis.AuthenticationError:
            return False
        finally:
            client.close()

    checks = {
        f"broker-{accounts.BRIDGE}": amqp_ok,
        "postgres": postgres_ok,
        "redis": redis_ok,
    }
    try:
        stack.up(apps=False, echo=False)
        old = {name: stack.secret(name) for name in checks}
        assert all(check(old[name]) for name, check in checks.items())
        stack.down(echo=False)
        for name in checks:
            (stack.run_dir / "secrets" / name).unlink()
        stack.up(apps=False, echo=False)
        for name, check in checks.items():
            new = stack.secret(name)
            assert new != old[name]
            assert check(new), f"{name}: the new password is refused"
            assert not check(old[name]), f"{name}: the old password still works"
    finally:
        with contextlib.suppress(Exception):
            stack.down(echo=False)
        shutil.rmtree(root, ignore_errors=True)
