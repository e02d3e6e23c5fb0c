"""The dispatcher against a real broker and database: a command is `sent` only once the broker
confirmed it, and one the broker refused stays `pending` for the next pass.

The stack's own api (whose dispatcher would take the same pending commands) is stopped for the
test and started again after it; the dispatcher under test publishes into a vhost of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from support import unique

from api.dispatcher import Dispatcher
from gateway.amqp import accounts, topology
from gateway.amqp.connection import connect
from gateway.amqp.publisher import Publisher, PublishFailed
from gateway.contract.commands import CommandRequest, CommandStatus
from gateway.devtools.localstack import LocalStack
from gateway.storage import command_store, registry

pytestmark = pytest.mark.integration


@pytest.fixture
def no_api(stack: LocalStack) -> Iterator[None]:
    was_running = stack.component("api").pid() is not None
    stack.stop_app("api")
    yield
    if was_running:
        stack.start_app("api")
        stack.wait_apps(("api",))


def status_of(engine: Engine, command_id) -> CommandStatus:
    with engine.connect() as conn:
        command = command_store.get(conn, command_id)
    assert command is not None
    return command.status


def test_sent_only_after_the_brokers_confirm(stack, engine, vhost, no_api) -> None:
    name = vhost.rsplit("/", 1)[1]
    device_id = unique("disp")
    with engine.begin() as conn:
        registry.register(conn, registry.Registration(device_id=device_id))
        command = command_store.create(conn, device_id, CommandRequest(name="reboot"))

    async def dispatch() -> bool:
        connection = await connect(vhost, name="test-dispatcher")
        try:
            channel = await connection.channel()
            await topology.declare(channel, inbox=True)  # `devices.#` bound: routable
            publisher = await Publisher.open(connection, timeout=5)
            return await Dispatcher(engine, publisher).dispatch_once()
        finally:
            await connection.close()

    # The broker refuses the publish (no topic permission for `devices.` keys in this vhost).
    stack.management(
        "PUT",
        f"/api/topic-permissions/{name}/{accounts.ADMIN}",
        {"exchange": "amq.topic", "write": "^$", "read": ".*"},
    )
    with pytest.raises(PublishFailed):
        asyncio.run(dispatch())
    assert status_of(engine, command.id) == CommandStatus.PENDING
    # Allowed again: the next pass publishes it, the broker confirms, and only then it is sent.
    stack.management("DELETE", f"/api/topic-permissions/{name}/{accounts.ADMIN}")
    asyncio.run(dispatch())
    assert status_of(engine, command.id) == CommandStatus.SENT
