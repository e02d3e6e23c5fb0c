"""Settling consumed messages: ack and requeue that survive a closed channel, and `Acks`, which
settles a consumer's messages in delivery order with as few frames as it can."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aio_pika.abc
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

log = logging.getLogger(__name__)


async def ack(message: aio_pika.abc.AbstractIncomingMessage, *, multiple: bool = False) -> bool:
    """Ack (with `multiple`: this message and every earlier unacked one of its channel); False
    when the message's channel is gone (the broker redelivers then, and every write downstream
    is idempotent)."""
    try:
        await message.ack(multiple=multiple)
    except (AMQPError, ChannelInvalidStateError, RuntimeError, OSError):
        return False
    return True


async def requeue(message: aio_pika.abc.AbstractIncomingMessage, *, multiple: bool = False) -> bool:
    """Nack with requeue (with `multiple`: this message and every earlier unacked one of its
    channel); False when the channel is gone (the broker requeues them anyway)."""
    try:
        await message.nack(multiple=multiple, requeue=True)
    except (AMQPError, ChannelInvalidStateError, RuntimeError, OSError):
        return False
    return True


class Acks:
    """Settles a consumer's messages in delivery order, each run of them with one frame.

    `delivered` is called for every message as it arrives, then `done` (ack it) or `requeue`
    (back to the queue) once it is handled. A message is settled once it and every message
    delivered before it on its channel are: a run of done messages goes as one `basic.ack` with
    `multiple`, a run of requeued ones as one `basic.nack` with `multiple`, sent after the
    handlers that finished in the same turn of the event loop (a confirmed work message
    finishes many at once). A message still being handled holds back the ones after it, never
    the other way round.

    Every frame goes out from one task, in delivery order. That is what keeps a requeued
    message alive: a frame waits its turn in the connection's bounded queue, so a nack sent by
    its own handler could be overtaken by another task's ack with `multiple`, and the broker
    would take that ack for this message too and drop it, unhandled (then refuse the nack:
    `unknown delivery tag`).
    """

    def __init__(self) -> None:
        #: Per channel: its messages not settled yet, by delivery tag (in delivery order).
        self._open: dict[Any, dict[int, aio_pika.abc.AbstractIncomingMessage]] = {}
        #: Per channel: how each handled one among them is settled (True: ack, False: requeue).
        self._handled: dict[Any, dict[int, bool]] = {}
        self._flush: asyncio.Task | None = None
        self._dirty = False

    def delivered(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        with contextlib.suppress(ChannelInvalidStateError):  # gone: it is redelivered
            self._open.setdefault(message.channel, {})[message.delivery_tag] = message

    def done(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self._handle(message, ack=True)

    def requeue(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self._handle(message, ack=False)

    def _handle(self, message: aio_pika.abc.AbstractIncomingMessage, *, ack: bool) -> None:
        with contextlib.suppress(ChannelInvalidStateError):
            self._handled.setdefault(message.channel, {})[message.delivery_tag] = ack
            self._schedule()

    async def drain(self) -> None:
        """Send the frames that are due (before closing the connection)."""
        while self._flush is not None:
            await self._flush

    def _schedule(self) -> None:
        """A task sends the frames. It lets the loop turn once more before it looks, so that
        the handlers woken together (by one confirm, or one stored batch) share a frame."""
        self._dirty = True
        if self._flush is None:
            self._flush = asyncio.create_task(self._send())

    async def _send(self) -> None:
        try:
            await asyncio.sleep(0)
            while self._dirty:
                self._dirty = False
                for channel, tags in list(self._open.items()):
                    handled = self._handled.get(channel, {})
                    if channel.is_closed:  # its messages are redelivered
                        del self._open[channel]
                        self._handled.pop(channel, None)
                        continue
                    while tags and (settle := handled.get(next(iter(tags)))) is not None:
                        last = None
                        while tags and handled.get(tag := next(iter(tags))) is settle:
                            last = tags.pop(tag)
                            del handled[tag]
                        await (ack if settle else requeue)(last, multiple=True)
        finally:
            self._flush = None
