"""The broker ceiling's consumer, in a process of its own (not the load generator's).

Takes messages from one queue and acks them, nothing else: one `multiple` ack for what arrives
in a turn of the event loop, as the bridge acks its runs. It counts deliveries per 10 ms by
the wall clock, so the benchmark counts them over the same marks as the end-to-end run's
commits. Reads the AMQP URL from `BENCH_AMQP_URL` (never the command line, which other users
see). Prints `consuming` once subscribed, then `consumed <total so far>` every 100 ms (the
benchmark steers its devices by it); when its standard input closes it prints
`{"buckets": {"<10 ms since the epoch>": count, ...}, "consumed": total}` and exits.

    BENCH_AMQP_URL=amqp://... python bench/inbox_consumer.py gateway.mqtt.inbox
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import time

import aiormq
import aiormq.abc

PREFETCH = 1000


async def consume(url: str, queue: str) -> collections.Counter[int]:
    buckets: collections.Counter[int] = collections.Counter()
    loop = asyncio.get_running_loop()
    # Standard input closing (the benchmark is done, or gone) ends the run.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=PREFETCH)
        consumed = 0
        last_tag = 0
        acked_tag = 0
        flush_due = False
        acks: set[asyncio.Task] = set()

        def flush() -> None:
            nonlocal acked_tag, flush_due
            flush_due = False
            if last_tag > acked_tag:
                acked_tag = last_tag
                task = asyncio.ensure_future(channel.basic_ack(last_tag, multiple=True))
                acks.add(task)
                task.add_done_callback(acks.discard)

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            nonlocal last_tag, flush_due, consumed
            consumed += 1
            buckets[int(time.time() * 100)] += 1
            last_tag = max(last_tag, message.delivery_tag)
            if not flush_due:
                flush_due = True
                loop.call_soon(flush)

        await channel.basic_consume(queue, on_message)
        print("consuming", flush=True)

        async def report() -> None:
            while True:
                print(f"consumed {consumed}", flush=True)
                await asyncio.sleep(0.1)

        reporter = asyncio.create_task(report())
        while await reader.read(4096):
            pass
        reporter.cancel()
        flush()
        if acks:
            await asyncio.wait(acks, timeout=10)
    finally:
        await connection.close()
    return buckets


def main() -> int:
    buckets = asyncio.run(consume(os.environ["BENCH_AMQP_URL"], sys.argv[1]))
    print(json.dumps({"buckets": buckets, "consumed": sum(buckets.values())}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
