"""Keeping the embedded broker small: the routed topic is emptied once it has been applied.

The embedded broker keeps every message it is sent, and its work for each fetch grows with
what a partition holds (``bench/broker.py``: ~0.4 ms of broker CPU per message sent to an
empty partition read at its end, ~1.9 ms at 10,000 messages), so under sustained load the
latency of every event rose with time. Nothing needs the routed messages once they are applied:
the journal keeps every event, and the tables hold what was derived from them. So, with the
embedded broker, once a partition of the routed topic holds ``[broker]
embedded_compact_messages`` messages, `RoutedCompaction`:

1. holds new publishes (``POST /v1/events`` waits) and lets those in flight be acknowledged;
2. waits until the profile agent has applied every message published (it reports each batch);
3. deletes the topic, creates it again empty, and points the consumer at its offset 0;
4. lets the publishes go on.

If the agent has not caught up within ``drain_s`` (it may itself be waiting to publish), the
publishes go on and the next try comes ``backoff_s`` later. With an external Kafka cluster,
retention is Kafka's business and nothing here runs.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from faust.transport.drivers.aiokafka import server_list
from faust.types import TP

from personify.engine.app import app, current_config, publisher
from personify.engine.logging import get_logger
from personify.engine.metrics import ROUTED_COMPACTIONS
from personify.engine.publisher import Publisher
from personify.engine.transport import rewind

__all__ = ["RoutedCompaction", "compaction"]

_log = get_logger(__name__)


class RoutedCompaction:
    """Empties the routed topic of the embedded broker once it is applied (see the module).

    Args:
        pub: the publisher of routed events.
        threshold: messages in one partition that start a compaction; 0 never does.
        drain_s: how long publishes are held waiting for the agent to catch up.
        backoff_s: the wait before another try after one that gave up.
    """

    def __init__(
        self, pub: Publisher, threshold: int, drain_s: float = 0.5, backoff_s: float = 10.0
    ) -> None:
        self.pub = pub
        self.threshold = threshold
        self.drain_s = drain_s
        self.backoff_s = backoff_s
        #: Partition -> the offset after the last message the profile agent applied.
        self.applied: dict[int, int] = {}
        self._next_try = 0.0
        self._running = False

    def note_applied(self, partition: int, offset: int) -> None:
        """The profile agent applied the message at ``offset`` of ``partition``."""
        if offset >= self.applied.get(partition, 0):
            self.applied[partition] = offset + 1

    @property
    def due(self) -> bool:
        """Whether a partition holds enough to compact (and no try is running or backing off)."""
        return (
            self.threshold > 0
            and self.pub.ready.is_set()  # the journal's tail is published (not held)
            and not self._running
            and time.monotonic() >= self._next_try
            and max(self.pub.ends.values(), default=0) >= self.threshold
        )

    def drained(self) -> bool:
        """Whether every message published has been applied."""
        return all(self.applied.get(p, 0) >= end for p, end in self.pub.ends.items())

    async def run(self) -> bool:
        """Compact now if the agent catches up in time; return whether it did."""
        self._running = True
        try:
            t0 = time.perf_counter()
            async with self.pub.held():
                deadline = time.monotonic() + self.drain_s
                while not self.drained():
                    if time.monotonic() >= deadline:
                        self._next_try = time.monotonic() + self.backoff_s
                        _log.info(
                            "routed topic compaction postponed: the agent is behind",
                            published=dict(self.pub.ends),
                            applied=dict(self.applied),
                        )
                        return False
                    await asyncio.sleep(0.001)
                held = sum(self.pub.ends.values())
                await self._recreate()
                self.pub.ends.clear()
                self.applied.clear()
            ROUTED_COMPACTIONS.inc()
            _log.info(
                "routed topic compacted",
                messages=held,
                took_ms=round((time.perf_counter() - t0) * 1000, 1),
            )
            return True
        finally:
            self._running = False

    async def _recreate(self) -> None:
        cfg = current_config()
        name = cfg.topics.routed
        admin = AIOKafkaAdminClient(bootstrap_servers=server_list(app.conf.broker, 9092))
        await admin.start()
        try:
            await admin.delete_topics([name])
            await admin.create_topics(
                [NewTopic(name, cfg.broker.partitions, cfg.broker.replication_factor)]
            )
        finally:
            await admin.close()
        await rewind(app.consumer, [TP(name, p) for p in range(cfg.broker.partitions)])


_compaction: RoutedCompaction | None = None


def compaction() -> RoutedCompaction:
    """The process's compaction of the routed topic (never due without the embedded broker)."""
    global _compaction
    if _compaction is None:
        cfg = current_config()
        threshold = cfg.broker.embedded_compact_messages if cfg.broker.embedded else 0
        _compaction = RoutedCompaction(publisher(), threshold)
    return _compaction


@app.timer(1.0)  # type: ignore[untyped-decorator] # Faust is untyped
async def _compact_when_due() -> None:
    routed = compaction()
    if routed.due:
        await routed.run()
