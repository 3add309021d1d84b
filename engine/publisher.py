"""Publishing validated events to the routed topic, one message per partition.

Every producer of validated events (the HTTP API, the ingest agent) goes through `Publisher`:
events are grouped by the partition of their key (the same murmur2 partitioner as Kafka's
Java client, so keys land where any Kafka client would put them), each group travels as one
message (a JSON array), and `publish` returns only when the broker has acknowledged every
message. With the journal enabled, the messages are journaled first and replayed on start.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson
from aiokafka.partitioner import murmur2

from personify.engine.journal import Journal
from personify.engine.logging import get_logger
from personify.engine.models import Event, event_key

__all__ = ["SEQ_HEADER", "PublishTimeout", "Publisher", "partition_for"]

SEQ_HEADER = "personify-seq"
#: Routed messages carry at most this many events (keeps messages well under 1 MB).
MAX_EVENTS_PER_MESSAGE = 500
_log = get_logger(__name__)


class PublishTimeout(TimeoutError):
    """The broker did not acknowledge a publish in time.

    The publish goes on: its events may still be applied. A retry with the same event ids is
    safe (a profile skips an event id it has applied).
    """


def _retrieve(fut: asyncio.Future[None]) -> None:
    """Mark a publish's outcome as seen (its caller may have stopped waiting for it)."""
    if not fut.cancelled():
        fut.exception()


def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for ``key``."""
    hashed: int = murmur2(key.encode())
    return (hashed & 0x7FFFFFFF) % partitions


class Publisher:
    """Publishes event batches to the routed topic (journaled when a journal is given).

    Args:
        topic: the Faust topic of routed events.
        partitions: its partition count.
        journal: the journal, or None when the broker is durable on its own.
        timeout_s: how long `publish` and `publish_records` wait for the broker before they
            raise `PublishTimeout` (None: as long as the producer's own timeout).
    """

    def __init__(
        self, topic: Any, partitions: int, journal: Journal | None, timeout_s: float | None = None
    ) -> None:
        self.topic = topic
        self.partitions = partitions
        self.journal = journal
        self.timeout_s = timeout_s
        self.ready = asyncio.Event()
        #: Journal records below this were replayed at start.
        self.replayed_until = 0
        self._queue: list[tuple[list[Event], asyncio.Future[None]]] = []
        self._flusher: asyncio.Future[None] | None = None
        #: Partition -> the offset after the last message published to it (by this process).
        self.ends: dict[int, int] = {}
        self._open = asyncio.Event()
        self._open.set()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def group(self, events: Iterable[Event]) -> dict[int, list[Event]]:
        """Group events by partition, keeping their order."""
        groups: dict[int, list[Event]] = {}
        for event in events:
            groups.setdefault(partition_for(event_key(event), self.partitions), []).append(event)
        return groups

    async def publish(self, events: list[Event]) -> None:
        """Publish ``events``; return once the broker has them (and the journal, if any).

        Concurrent calls are coalesced: while one flush waits for the disk and the broker,
        the events of the callers arriving meanwhile gather and go out together in the next
        one (one journal append, one message per partition). Under light load a call is
        flushed on the next turn of the event loop, so nothing waits for a timer.
        """
        if not events:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((events, done))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        await self._bounded(done)

    async def _bounded(self, fut: asyncio.Future[None]) -> None:
        """Wait for ``fut`` at most ``timeout_s``; it goes on if the wait ends first."""
        if self.timeout_s is None:
            await fut
            return
        fut.add_done_callback(_retrieve)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except TimeoutError:
            raise PublishTimeout(
                f"not acknowledged within {self.timeout_s:g} s (it may still be applied)"
            ) from None

    async def _flush(self) -> None:
        try:
            while self._queue:
                await asyncio.sleep(0)  # let callers of this same turn join the batch
                batch, self._queue = self._queue, []
                try:
                    await self._publish_now([e for events, _done in batch for e in events])
                except BaseException as exc:
                    cancelled = isinstance(exc, asyncio.CancelledError)
                    for _events, done in batch:
                        if not done.done():
                            done.cancel() if cancelled else done.set_exception(exc)
                    if cancelled:
                        raise
                else:
                    for _events, done in batch:
                        if not done.done():
                            done.set_result(None)
        finally:
            self._flusher = None

    async def _publish_now(self, events: list[Event]) -> None:
        records = [
            (p, orjson.dumps(group[i : i + MAX_EVENTS_PER_MESSAGE]))
            for p, group in self.group(events).items()
            for i in range(0, len(group), MAX_EVENTS_PER_MESSAGE)
        ]
        await self._publish_when_open(records)

    async def publish_records(self, records: list[tuple[int, bytes]]) -> None:
        """Publish ready-made ``(partition, payload)`` messages (waits while `held`)."""
        await self._bounded(asyncio.ensure_future(self._publish_when_open(records)))

    async def _publish_when_open(self, records: list[tuple[int, bytes]]) -> None:
        while not self._open.is_set():
            await self._open.wait()
        self._in_flight += 1
        self._idle.clear()
        try:
            await self._publish_records(records)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _publish_records(self, records: list[tuple[int, bytes]]) -> None:
        seqs: list[int] = []
        if self.journal is not None:
            seqs = await self.journal.append(records)
        try:
            futures = []
            for i, (partition, payload) in enumerate(records):
                headers = [(SEQ_HEADER, str(seqs[i]).encode())] if seqs else None
                futures.append(
                    await self.topic.send(
                        value=payload, partition=partition, headers=headers, force=True
                    )
                )
            sent = await asyncio.gather(*futures)
        except BaseException:
            if self.journal is not None:
                await self.journal.abort(seqs)
            raise
        self._note_sent(sent)

    def _note_sent(self, sent: Iterable[Any]) -> None:
        for meta in sent:  # Faust's RecordMetadata
            self.ends[meta.partition] = max(self.ends.get(meta.partition, 0), meta.offset + 1)

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Hold new publishes for the block; it starts once those in flight are acknowledged."""
        self._open.clear()
        try:
            await self._idle.wait()
            yield
        finally:
            self._open.set()

    @property
    def caught_up(self) -> bool:
        """Whether the replayed journal tail has been applied to the tables."""
        return self.ready.is_set() and (
            self.journal is None or self.journal.checkpoint >= self.replayed_until
        )

    async def replay(self, start: int) -> int:
        """Publish again every journal record from ``start`` on; return how many."""
        if self.journal is None:
            return 0
        records = self.journal.records_from(start)
        if records:
            _log.info("journal replay", records=len(records), from_seq=start)
        batch: list[Any] = []
        done = 0
        for seq, partition, payload in records:
            batch.append(
                await self.topic.send(
                    value=payload,
                    partition=partition,
                    headers=[(SEQ_HEADER, str(seq).encode())],
                    force=True,
                )
            )
            if len(batch) >= 1000:
                self._note_sent(await asyncio.gather(*batch))
                done += len(batch)
                batch.clear()
                _log.info("journal replay progress", published=done, total=len(records))
        self._note_sent(await asyncio.gather(*batch))
        self.replayed_until = self.journal.next_seq
        return len(records)
