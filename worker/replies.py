"""Devices' replies to commands (queue `gateway.replies`): stored once, or dead-lettered.

A reply moves its command to `succeeded` or `failed` in one transaction; a repeat changes
nothing; a reply to an unknown command, another device's, a cancelled or an expired one
becomes a dead letter with that reason. The message is acked only after that (the commit, or
the dead letter's confirm), so a worker killed meanwhile leaves it to be redelivered, and the
redelivered copy is a repeat or the same dead letter (its id derived from the reply's).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable

from pydantic import ValidationError
from sqlalchemy import Engine

from gateway import command_store
from gateway.broker import Acks
from gateway.commands import CommandReply
from gateway.errors import InputError, Reason
from gateway.messages import Rejection, Source
from worker.batcher import Message

log = logging.getLogger(__name__)

#: Ids of the dead letters of refused replies, derived from the replies' ids.
REPLY_NAMESPACE = uuid.UUID("5b0e7a52-3c1d-4f7e-8a61-2f9d0c4b7e18")

DeadLetter = Callable[[Rejection], Awaitable[bool]]
Retry = Callable[[Callable[[], object]], Awaitable[object]]


def rejection_of(reply: CommandReply, error: InputError) -> Rejection:
    rejection = Rejection.of(
        error,
        reply.encode(),
        reply.source,
        device_id=reply.device_id,
        topic=f"devices/{reply.device_id}/replies",
        received_at=reply.received_at,
    )
    return rejection.model_copy(update={"id": uuid.uuid5(REPLY_NAMESPACE, str(reply.id))})


class Replies:
    def __init__(self, engine: Engine, dead_letter: DeadLetter, retry: Retry) -> None:
        self.engine = engine
        self._dead_letter = dead_letter
        self._retry = retry
        self.applied = 0
        self.refused = 0

    async def flush(self, messages: list[Message], acks: Acks) -> None:
        """Ack each message once its reply is stored or dead-lettered; requeue it otherwise
        (the database or the broker away: it is tried again)."""
        for message in messages:
            if await self._one(message):
                acks.done(message)
            else:
                acks.requeue(message)

    async def _one(self, message: Message) -> bool:
        """True once the reply is stored or dead-lettered (the message may be acked)."""
        try:
            reply = CommandReply.decode(message.body)
        except (ValidationError, ValueError) as exc:
            error = InputError(Reason.INVALID_MESSAGE, f"not a converted reply: {exc}"[:500])
            return await self._dead_letter(
                Rejection.of(error, message.body[:65536], Source.WORK_QUEUE)
            )

        def write() -> command_store.ReplyApplied:
            with self.engine.begin() as conn:
                return command_store.apply_reply(conn, reply)

        outcome = await self._retry(write)
        if outcome is None:
            return False  # stopping with the database away: redelivered later
        assert isinstance(outcome, command_store.ReplyApplied)
        if outcome.error is not None:
            self.refused += 1
            return await self._dead_letter(rejection_of(reply, outcome.error))
        if outcome.command is not None:
            self.applied += 1
            log.info(
                "command %s of %s: %s", reply.command_id, reply.device_id, outcome.command.status
            )
        return True
