"""`Acks`: messages are settled in delivery order, a run of them with one frame; an ack never
covers a message that is still being handled or was requeued."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aio_pika
import aio_pika.abc
import pytest

from gateway.amqp.acks import Acks


@dataclass(eq=False)
class FakeChannel:
    is_closed: bool = False
    frames: list[tuple[str, int, bool]] = field(default_factory=list)
    #: A busy connection's frame queue, as aiormq's (bounded; a writer task empties it).
    outbox: asyncio.Queue | None = None

    async def write(self, frame: tuple[str, int, bool]) -> None:
        if self.outbox is None:
            self.frames.append(frame)
        else:
            await self.outbox.put(frame)

    async def writer(self) -> None:
        assert self.outbox is not None
        while True:
            self.frames.append(await self.outbox.get())
            self.outbox.task_done()
            await asyncio.sleep(0)  # the socket takes its time


@dataclass(eq=False)
class FakeMessage:
    channel: FakeChannel
    delivery_tag: int

    async def ack(self, multiple: bool = False) -> None:
        await self.channel.write(("ack", self.delivery_tag, multiple))

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        assert requeue
        await self.channel.write(("nack", self.delivery_tag, multiple))


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
        acks.requeue(two)
        await acks.drain()
        return channel

    assert asyncio.run(scenario()).frames == [("ack", 1, True), ("nack", 2, True), ("ack", 3, True)]


def settle_on_a_busy_connection(seed: int, count: int = 300) -> list[tuple[str, int, bool]]:
    """`count` delivered; every third requeued, the others done, each by its own task after a
    few turns of the loop, while frames wait in a small queue that another channel (a
    publisher) keeps full: aiormq's bounded frame queue on a busy connection."""
    rng = random.Random(seed)

    async def scenario() -> list[tuple[str, int, bool]]:
        outbox: asyncio.Queue = asyncio.Queue(maxsize=2)
        acks, channel = Acks(), FakeChannel(outbox=outbox)
        writer = asyncio.create_task(channel.writer())

        async def publish() -> None:
            while True:
                await outbox.put(("publish", 0, False))

        async def handle(message: FakeMessage) -> None:
            for _ in range(rng.randrange(5)):
                await asyncio.sleep(0)
            if message.delivery_tag % 3 == 0:
                acks.requeue(message)
            else:
                acks.done(message)

        publisher = asyncio.create_task(publish())
        await asyncio.gather(*(handle(m) for m in deliver(acks, channel, count)))
        await acks.drain()
        publisher.cancel()
        await outbox.join()
        writer.cancel()
        return [frame for frame in channel.frames if frame[0] != "publish"]

    return asyncio.run(scenario())


@pytest.mark.parametrize("seed", range(20))
def test_no_ack_overtakes_the_nack_of_an_earlier_message(seed: int) -> None:
    """What lost a heartbeat when RabbitMQ restarted: the bridge's nacks waited in a busy
    connection's frame queue while another task's ack with `multiple` went first and took the
    requeued messages with it. Replaying the frames in order as the broker does (an ack or a
    nack with `multiple` settles every open tag up to its own), each tag must be settled
    once, by the frame meant for it, and no frame may name a tag already settled."""
    count = 300
    settled_by: dict[int, str] = {}
    for kind, tag, multiple in settle_on_a_busy_connection(seed, count):
        covered = [t for t in range(1, tag + 1) if t not in settled_by] if multiple else [tag]
        assert tag not in settled_by, f"{kind} of tag {tag}, settled already: unknown delivery tag"
        for t in covered:
            settled_by[t] = kind
    assert settled_by == {t: "nack" if t % 3 == 0 else "ack" for t in range(1, count + 1)}


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


def test_on_rabbitmq_requeued_messages_come_back_while_the_others_are_acked(vhost: str) -> None:
    """The real broker and aio-pika's bounded frame queue, as in the bridge after a broker
    restart: 600 delivered; every third fails at first and is requeued, all at once, while the
    others are acked and another channel of the same connection keeps publishing (the bridge's
    forwarding), so frames queue up behind each other. Each requeued message comes back, each
    message is handled, and the broker never refuses a nack (`unknown delivery tag`: an ack
    with `multiple` went first and dropped a message nobody handled)."""
    count = 600

    async def scenario() -> None:
        async with await aio_pika.connect(vhost) as connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=count)
            queue = await channel.declare_queue(exclusive=True)
            for i in range(count):
                await channel.default_exchange.publish(aio_pika.Message(b"%d" % i), queue.name)
            acks, handled, all_delivered = Acks(), set(), asyncio.Event()
            received = 0

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                nonlocal received
                acks.delivered(message)
                number = int(message.body)
                if number % 3 == 0 and not message.redelivered:
                    received += 1
                    if received == count // 3:
                        all_delivered.set()
                    await all_delivered.wait()  # they fail together, as in the bridge
                    acks.requeue(message)
                    return
                handled.add(number)
                acks.done(message)

            publisher = await connection.channel()
            sink = await publisher.declare_queue(exclusive=True)

            async def publish_meanwhile() -> None:
                while True:
                    await publisher.default_exchange.publish(
                        aio_pika.Message(b"x" * 1024), sink.name
                    )

            busy = [asyncio.create_task(publish_meanwhile()) for _ in range(20)]
            try:
                await queue.consume(on_message)
                deadline = time.monotonic() + 30
                while len(handled) < count and not channel.is_closed:
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
                await acks.drain()
            finally:
                for task in busy:
                    task.cancel()
                await asyncio.gather(*busy, return_exceptions=True)
            assert not channel.is_closed, (
                "the broker closed the channel: an ack went before a nack and dropped messages"
            )
            assert handled == set(range(count))

    asyncio.run(scenario())
