"""Collect consumed messages into batches: flush when full, after a linger, or (with no linger)
as soon as the previous batch is written."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import aio_pika.abc

from gateway.amqp.publisher import ITEMS_HEADER
from gateway.contract.messages import MAX_BATCH_ITEMS

Message = aio_pika.abc.AbstractIncomingMessage
Flush = Callable[[list[Message]], Awaitable[None]]


class Batcher:
    """Buffers messages from a consumer and hands them to `flush` in order, one batch at a time.

    The consumer's prefetch bounds the buffer: while a batch is being written, the broker keeps
    delivering up to the prefetch, and those form the next batch. `size` counts items: a message
    carrying several canonical messages (its `x-gateway-items` header) weighs that many.
    """

    def __init__(self, flush: Flush, *, size: int, linger_s: float) -> None:
        self._flush = flush
        self._size = size
        self._linger_s = linger_s
        self._buffer: list[tuple[Message, int]] = []  # with its weight
        self._weight = 0  # of the whole buffer
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()

    async def add(self, message: Message) -> None:
        weight = _weight(message)
        self._buffer.append((message, weight))
        self._weight += weight
        self._arrived.set()
        if self._weight >= self._size:
            self._full.set()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def run(self, stop: asyncio.Event) -> None:
        """Flush batches until `stop` is set and the buffer is empty."""
        while True:
            if not self._buffer:
                if stop.is_set():
                    return
                waiter = asyncio.ensure_future(self._arrived.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                continue
            if self._linger_s and self._weight < self._size and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._linger_s)
            count, taken = 0, 0
            while count < len(self._buffer) and (count == 0 or taken < self._size):
                taken += self._buffer[count][1]
                count += 1
            batch = [message for message, _ in self._buffer[:count]]
            del self._buffer[:count]
            self._weight -= taken
            if self._weight < self._size:
                self._full.clear()
            if not self._buffer:
                self._arrived.clear()
            await self._flush(batch)


def _weight(message: Message) -> int:
    """How many canonical messages `message` carries: what its header says, as a whole number
    from 1 to a batch's most, and 1 when the header is absent or anything else."""
    headers = message.headers
    value = headers.get(ITEMS_HEADER) if isinstance(headers, dict) else None
    if type(value) is not int:  # not a bool, a float, text, bytes, a table...
        return 1
    return min(max(value, 1), MAX_BATCH_ITEMS)
