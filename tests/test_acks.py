"""`Acks`: messages are acked in delivery order, a run of them with one frame, never one that
is still being handled or was requeued."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aio_pika
import aio_pika.abc
import pytest

from gateway.broker import Acks


@dataclass(eq=False)
class FakeChannel:
    is_closed: bool = False
    frames: list[tuple[str, int, bool]] = field(default_factory=list)


@dataclass(eq=False)
class FakeMessage:
    channel: FakeChannel
    delivery_tag: int

    async def ack(self, multiple: bool = False) -> None:
        self.channel.frames.append(("ack", self.delivery_tag, multiple))

    async def nack(self, requeue: bool = False) -> None:
        self.channel.frames.append(("nack", self.delivery_tag, requeue))


def deliver(acks: Acks, channel: FakeChannel, count: int) -> list[FakeMessage]:
    messages = [FakeMessage(channel, tag) for tag in range(1, count + 1)]
    for message in messages:
        acks.delivered(message)
    return messages


async def finish_all(count: int, *, one_turn_each: bool) -> list[tuple[str, int, bool]]:
    """Deliver `count` messages and finish them all: together, or one per turn of the loop."""
    acks, channel = Acks(), FakeChannel()
    for message in deliver(acks, channel, count):
        acks.done(message)
        if one_turn_each:
            await asyncio.sleep(0)
    await acks.drain()
    return channel.frames


def test_a_run_of_done_messages_is_acked_with_one_frame() -> None:
    assert asyncio.run(finish_all(5, one_turn_each=False)) == [("ack", 5, True)]


def test_acks_that_fall_due_while_sending_are_sent_too() -> None:
    frames = asyncio.run(finish_all(200, one_turn_each=True))
    assert frames[-1] == ("ack", 200, True)
    assert len(frames) < 200


def test_a_message_still_handled_holds_back_the_ones_after_it() -> None:
    async def scenario() -> list[list[tuple[str, int, bool]]]:
        acks, channel = Acks(), FakeChannel()
        one, two, three, four = deliver(acks, channel, 4)
        seen = []
        for message in (one, three, four):
            acks.done(message)
        await acks.drain()
        seen.append(list(channel.frames))  # 1 only: 2 is still being handled
        acks.done(two)
        await acks.drain()
        seen.append(list(channel.frames))
        return seen

    before, after = asyncio.run(scenario())
    assert before == [("ack", 1, True)]
    assert after == [("ack", 1, True), ("ack", 4, True)]


def test_a_requeued_message_is_nacked_before_any_ack_covers_it() -> None:
    async def scenario() -> FakeChannel:
        acks, channel = Acks(), FakeChannel()
        one, two, three = deliver(acks, channel, 3)
        acks.done(one)
        acks.done(three)
        await acks.requeue(two)
        await acks.drain()
        return channel

    frames = asyncio.run(scenario()).frames
    assert frames.index(("nack", 2, True)) < frames.index(("ack", 3, True))
    assert ("ack", 2, True) not in frames and ("ack", 2, False) not in frames


def test_messages_of_a_closed_channel_are_never_acked() -> None:
    async def scenario() -> tuple[FakeChannel, FakeChannel]:
        acks, old, new = Acks(), FakeChannel(), FakeChannel()
        stale = deliver(acks, old, 2)
        old.is_closed = True  # the broker redelivers its messages on the new channel
        fresh = deliver(acks, new, 2)
        for message in (*stale, *fresh):
            acks.done(message)
        await acks.drain()
        return old, new

    old, new = asyncio.run(scenario())
    assert old.frames == []
    assert new.frames == [("ack", 2, True)]


def test_on_rabbitmq_only_the_run_of_done_messages_is_acked(vhost: str) -> None:
    """The real broker: 10 delivered, the 4th still being handled when the others are done.
    Only 1-3 are acked; when the channel closes, the 4th and the 6 after it come back."""

    async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        async with await aio_pika.connect(vhost) as connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=10)
            queue = await channel.declare_queue(exclusive=True)
            for i in range(10):
                await channel.default_exchange.publish(aio_pika.Message(b"%d" % i), queue.name)
            acks, got = Acks(), []

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                acks.delivered(message)
                got.append(message)

            await queue.consume(on_message)

            async def all_delivered() -> bool:
                return len(got) == 10

            await until(all_delivered, "10 deliveries")
            for message in got[:3] + got[4:]:
                acks.done(message)
            await acks.drain()
            await channel.close()  # what it did not ack goes back to the queue
            other = await connection.channel()

            async def back_in_queue() -> bool:
                declared = await other.declare_queue(queue.name, passive=True)
                return declared.declaration_result.message_count == 7

            await until(back_in_queue, "the 7 unacked messages back in the queue")

    asyncio.run(scenario())
