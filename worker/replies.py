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
from sqlalchemy.exc import SQLAlchemyError

from gateway.amqp.acks import Acks
from gateway.contract.commands import CommandReply
from gateway.contract.messages import Rejection, Source
from gateway.contract.reasons import InputError, Reason
from gateway.storage import command_store
from gateway.storage.engine import short_error
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
        """Apply a batch of replies in one transaction (one by one if the database refuses
        the batch); ack each message once its reply is stored or dead-lettered, requeue it
        otherwise (the database or the broker away while stopping: it is tried again)."""
        readable: list[tuple[Message, CommandReply]] = []
        for message in messages:
            try:
                readable.append((message, CommandReply.decode(message.body)))
            except (ValidationError, ValueError) as exc:
                error = InputError(Reason.INVALID_MESSAGE, f"not a converted reply: {exc}"[:500])
                rejection = Rejection.of(error, message.body, Source.WORK_QUEUE)
                self._settle(acks, message, await self._dead_letter(rejection))
        # In command order: two workers lock the same commands in the same order.
        readable.sort(key=lambda pair: (pair[1].command_id.bytes, pair[1].received_at))
        replies = [reply for _, reply in readable]
        try:
            outcomes = await self._retry(lambda: self._write(replies))
        except SQLAlchemyError as exc:
            log.warning("replies refused as a batch (%s); one by one", short_error(exc))
            outcomes = []
            for reply in replies:
                try:
                    one = await self._retry(lambda r=reply: self._write([r]))
                except SQLAlchemyError as refused:
                    error = InputError(Reason.UNSTORABLE, short_error(refused))
                    one = [command_store.ReplyApplied(error=error)]
                outcomes.append(one[0] if one else None)
        if outcomes is None:
            for message, _ in readable:
                acks.requeue(message)
            return
        for (message, reply), outcome in zip(readable, outcomes, strict=True):
            if outcome is None:
                acks.requeue(message)
            elif outcome.error is not None:
                self.refused += 1
                self._settle(
                    acks, message, await self._dead_letter(rejection_of(reply, outcome.error))
                )
            else:
                self.applied += outcome.command is not None
                acks.done(message)
        log.debug("replies: %d applied, %d refused so far", self.applied, self.refused)

    def _write(self, replies: list[CommandReply]) -> list[command_store.ReplyApplied]:
        with self.engine.begin() as conn:
            return [command_store.apply_reply(conn, reply) for reply in replies]

    @staticmethod
    def _settle(acks: Acks, message: Message, done: bool) -> None:
        if done:
            acks.done(message)
        else:
            acks.requeue(message)
