"""Faust's aiokafka transport, tuned for low latency and exact restores.

Three changes to the stock driver, each measured against the embedded broker:

* the worker consumer's ``fetch_max_wait_ms`` comes from ``[worker] fetch_max_wait_ms``
  (Faust hard-codes 1,500 ms, and a waiting fetch on this broker returns only when that time
  runs out: p50 POST -> profile was ~550 ms, ~10 ms with 10);
* high-water marks (used to decide when a table restore is complete) are confirmed with a
  fetch, whose response carries the true high-water mark. ListOffsets on this broker answers
  the last batch's base offset + 1, which made restores stop early and drop updates;
* the producer never forgets a topic's partitions when it first sends to another topic
  (`TopicKeepingClient`): a batch already queued for the first topic waited for its leader
  until the request timeout (20 minutes), and every publish behind it with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.client import AIOKafkaClient
from aiokafka.structs import TopicPartition
from faust.transport.drivers import aiokafka as _driver

__all__ = [
    "TopicKeepingClient",
    "Transport",
    "commits_held",
    "confirmed_highwaters",
    "keep_topics",
    "rewind",
]


async def confirmed_highwaters(
    bootstrap: str | list[str], reported: Mapping[Any, int], wait_s: float = 10.0
) -> dict[Any, int]:
    """Return the true end offset of each partition, starting from a ListOffsets answer.

    Fetches one batch at ``reported - 1`` per partition; the fetch response's high-water mark is
    the truth. Falls back to the reported figure for a partition that does not answer in time.
    """
    if not reported:
        return {}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10
    )
    await consumer.start()
    try:
        tps = {TopicPartition(tp.topic, tp.partition): tp for tp in reported}
        consumer.assign(list(tps))
        for ktp, tp in tps.items():
            consumer.seek(ktp, max(reported[tp] - 1, 0))
        result: dict[Any, int] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while len(result) < len(tps) and loop.time() < deadline:
            missing = [ktp for ktp in tps if tps[ktp] not in result]
            await consumer.getmany(*missing, timeout_ms=100, max_records=1)
            for ktp in missing:
                hw = consumer.highwater(ktp)
                if hw is not None:
                    result[tps[ktp]] = max(hw, reported[tps[ktp]])
        for tp, off in reported.items():
            result.setdefault(tp, off)
        return result
    finally:
        await consumer.stop()


@contextlib.asynccontextmanager
async def commits_held(consumer: Any) -> AsyncIterator[None]:
    """Hold Faust's offset commits for the block (a commit under way finishes first).

    Faust lets one commit run at a time: a caller finding one under way waits for it and then
    skips its own. The block is such a commit to Faust, so commits are skipped, not failed,
    while a topic is briefly missing (a failed commit can crash Faust's consumer thread).
    """
    while consumer._commit_fut is not None:
        await asyncio.wait({consumer._commit_fut})
    held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    consumer._commit_fut = held
    try:
        yield
    finally:
        consumer._commit_fut = None
        held.set_result(None)


async def rewind(consumer: Any, tps: Iterable[Any]) -> None:
    """Point Faust's worker consumer at offset 0 of ``tps``, whose topic was just created again.

    Faust keeps, per partition, the offsets read, acknowledged and committed, and drops any
    message below the offset it read last: that bookkeeping is dropped, as when a partition is
    revoked, and the aiokafka consumer (which runs on Faust's consumer thread) seeks there.
    """
    tps = list(tps)
    thread = consumer._thread
    aio = thread._ensure_consumer()

    async def seek() -> None:
        for tp in tps:
            aio.seek(tp, 0)

    await thread.call_thread(seek)
    books = (
        consumer._gap,
        consumer._acked,
        consumer._acked_index,
        consumer._read_offset,
        consumer._committed_offset,
    )
    for tp in tps:
        for book in books:
            book.pop(tp, None)


class TopicKeepingClient(AIOKafkaClient):  # type: ignore[misc] # untyped base
    """aiokafka's client, except that tracking one more topic never drops those already known.

    A producer's client starts by tracking every topic (an empty set: metadata requests ask for
    all). The first send to a topic missing from that metadata makes aiokafka track that topic
    alone, and the next metadata answer drops every other topic's partitions: a batch queued
    for another topic then has no leader, and waits for one until the request timeout. Here
    the topics known at that moment stay tracked.
    """

    _topics: set[str]

    def add_topic(self, topic: str) -> Any:
        """Track ``topic`` as well (see the class); the future of the metadata update."""
        if not self._topics:  # tracking all: keep what is known, as well as the new topic
            self._topics = set(self.cluster.topics())
        return super().add_topic(topic)


def keep_topics(producer: AIOKafkaProducer) -> AIOKafkaProducer:
    """``producer``, its client made a `TopicKeepingClient` (same state, fixed method)."""
    producer.client.__class__ = TopicKeepingClient
    return producer


class _Producer(_driver.Producer):  # type: ignore[misc] # untyped base
    def _new_producer(self, transactional_id: str | None = None) -> AIOKafkaProducer:
        return keep_topics(super()._new_producer(transactional_id))


class _ConsumerThread(_driver.AIOKafkaConsumerThread):  # type: ignore[misc] # untyped base
    def _create_worker_consumer(self, transport: Any) -> AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # The consumer reads this attribute when it starts; Faust passes a fixed 1500.
        consumer._fetch_max_wait_ms = self.app.personify_fetch_max_wait_ms
        return consumer

    async def _highwaters(self, partitions: Iterable[Any]) -> Mapping[Any, int]:
        reported = await super()._highwaters(partitions)
        bootstrap = _driver.server_list(self.transport.url, self.transport.default_port)
        return await confirmed_highwaters(bootstrap, reported)


class _Consumer(_driver.Consumer):  # type: ignore[misc] # untyped base
    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(_driver.Transport):  # type: ignore[misc] # untyped base
    """The stock aiokafka transport with the consumer and producer above."""

    Consumer = _Consumer
    Producer = _Producer
