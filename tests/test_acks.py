"""`Acks`: messages are acked in delivery order, a run of them with one frame, never one that
is still being handled or was requeued."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

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


def test_a_run_of_done_messages_is_acked_with_one_frame() -> None:
    async def scenario() -> FakeChannel:
        acks, channel = Acks(), FakeChannel()
        messages = deliver(acks, channel, 5)
        for message in messages:
            acks.done(message)
        await acks.drain()
        return channel

    assert asyncio.run(scenario()).frames == [("ack", 5, True)]


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


def test_acks_that_fall_due_while_sending_are_sent_too() -> None:
    async def scenario() -> FakeChannel:
        acks, channel = Acks(), FakeChannel()
        messages = deliver(acks, channel, 200)
        for message in messages:
            acks.done(message)
            await asyncio.sleep(0)  # handlers finishing over many turns of the loop
        await acks.drain()
        return channel

    frames = asyncio.run(scenario()).frames
    assert frames[-1] == ("ack", 200, True)
    assert len(frames) < 200
